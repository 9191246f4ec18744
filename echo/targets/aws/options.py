"""The AWS target's ``-o KEY=VALUE`` options: parsed and checked once, with errors that say why.

Every problem raises :class:`ValueError` (the CLI prints it as one line): an unknown key, a
value of the wrong shape, or sizes Fargate does not offer together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from echo.config import to_bool, to_int

# Fargate's valid task sizes: CPU units -> memory (MiB) choices
FARGATE_SIZES: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4097, 1024)),
    1024: tuple(range(2048, 8193, 1024)),
    2048: tuple(range(4096, 16385, 1024)),
    4096: tuple(range(8192, 30721, 1024)),
}

OPTION_HELP: dict[str, str] = {
    "region": "AWS region (default: the profile's or AWS_REGION, else echo.toml aws_region)",
    "profile": "named profile from ~/.aws/config",
    "endpoint_url": "one endpoint for every AWS API (LocalStack, moto)",
    "stack_name": "CloudFormation stack name (default: from the project folder name)",
    "image": "use this server image instead of building and pushing one",
    "base_image": "base image of the build (Debian-like with Python 3.11+; default the Dockerfile's)",
    "architecture": "x86_64 or arm64: the image's CPU (default: the built image's, else x86_64)",
    "task_cpu": "Fargate CPU units per task: 256, 512, 1024, 2048, 4096",
    "task_memory": "MiB per task, valid for task_cpu",
    "min_tasks": "fewest tasks autoscaling keeps",
    "max_tasks": "most tasks autoscaling starts",
    "connections_per_task": "autoscaling target: open connections per task (default 5000)",
    "cache_node_type": "ElastiCache node type",
    "cache_replicas": "ElastiCache replicas (0..5; 1 = a second node and Multi-AZ failover, "
                      "0 = one node)",
    "redis_url": "use this Redis instead of creating an ElastiCache node (a user/password "
                 "in it goes to Secrets Manager, not the task definition)",
    "vpc_id": "deploy into this VPC (with subnet_ids) instead of creating one",
    "subnet_ids": "comma-separated public subnets of vpc_id (internet-facing ALB, tasks "
                  "with public IPs), two or more in different AZs",
    "long_polling": "true: sticky target group, so HTTP long-polling clients work",
    "domain": "the name clients use (chat.example.com): HTTPS on 443, 80 redirects to it",
    "hosted_zone_id": "Route 53 zone of domain: create and DNS-validate its certificate, "
                      "and alias the name to the load balancer",
    "certificate_arn": "your ACM certificate for domain (then you point its DNS at the ALB)",
    "allow_http": "true: without a domain, plain HTTP on 80 (tokens cross the network in "
                  "clear; test deployments only)",
    "timeout": "minutes to wait for a stack change (1..180)",
}

# what the state file remembers instead of a redis_url that holds a password
REDIS_URL_STORED = "(kept in Secrets Manager)"
STACK_NAME = re.compile(r"^[a-zA-Z][-a-zA-Z0-9]{0,27}$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
CACHE_NODE = re.compile(r"^cache\.[a-z0-9]+\.[a-z0-9]+$")
IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:@+-]*$", re.IGNORECASE)
VPC = re.compile(r"^vpc-[0-9a-f]{8}(?:[0-9a-f]{9})?$")
SUBNET = re.compile(r"^subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?$")
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
HOSTED_ZONE = re.compile(r"^Z[A-Z0-9]{1,31}$")
CERTIFICATE = re.compile(r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class AwsOptions:
    stack_name: str
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    image: str | None = None
    base_image: str | None = None
    architecture: str | None = None
    task_cpu: int = 256
    task_memory: int = 512
    min_tasks: int = 1
    max_tasks: int = 4
    connections_per_task: int = 5000
    cache_node_type: str = "cache.t4g.micro"
    cache_replicas: int = 1
    redis_url: str | None = None
    redis_url_secret: bool = False  # the URL holds credentials: ECS injects it from a secret
    long_polling: bool = False
    vpc_id: str | None = None
    subnet_ids: tuple[str, ...] = ()
    domain: str | None = None
    hosted_zone_id: str | None = None
    certificate_arn: str | None = None
    allow_http: bool = False
    timeout_minutes: int = 45

    @property
    def lambda_prefix(self) -> str:
        """Function names on Lambda: ``STACK_name``. Stack names cannot hold ``_``, so
        ``STACK_*`` matches this deployment's functions and no other stack's."""
        return f"{self.stack_name}_"

    @property
    def own_redis(self) -> bool:
        """A Redis of the user's (``redis_url``), so the stack creates no ElastiCache."""
        return self.redis_url is not None or self.redis_url_secret

    @property
    def https(self) -> bool:
        """HTTPS needs a name a certificate can cover: the ALB's own DNS name is not one."""
        return self.domain is not None

    def exposure_problem(self) -> str | None:
        """Why this deployment must not go up as configured (None when it may).

        Checked by deploy and ``--dry-run`` only, so status and teardown of an older
        deployment still work with its remembered options.
        """
        fix = ("pass -o domain=NAME -o hosted_zone_id=ZONE (certificate and DNS created), "
               "or -o domain=NAME -o certificate_arn=ARN (your certificate), or -o "
               "allow_http=true for a test deployment whose tokens cross the network in clear")
        if self.domain is None:
            if self.hosted_zone_id or self.certificate_arn:
                given = "hosted_zone_id" if self.hosted_zone_id else "certificate_arn"
                return f"-o {given} needs -o domain=NAME, the name clients use; {fix}"
            if not self.allow_http:
                return f"no domain: the endpoint would be plain HTTP; {fix}"
            return None
        if not (self.hosted_zone_id or self.certificate_arn):
            return (f"-o domain={self.domain} needs -o hosted_zone_id=ZONE (the Route 53 zone "
                    "that holds it) or -o certificate_arn=ARN (an ACM certificate for it)")
        return None


def has_credentials(url: str) -> bool:
    """Whether a URL carries a user or password (``scheme://user:pw@host``)."""
    return "@" in url.split("//", 1)[-1].split("/", 1)[0]


def default_stack_name(project_dir: Path) -> str:
    """``my project.v2`` -> ``my-project-v2``: CloudFormation's rules, lower case for ECR."""
    name = re.sub(r"[^a-z0-9]+", "-", project_dir.resolve().name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"echo-{name}".rstrip("-")
    return name[:28].rstrip("-")


def parse_options(raw: dict[str, str], project_dir: Path) -> AwsOptions:
    unknown = sorted(set(raw) - set(OPTION_HELP))
    if unknown:
        raise ValueError(
            f"aws target: unknown option {unknown[0]!r} (known: {', '.join(OPTION_HELP)})"
        )
    empty = [key for key, value in raw.items() if not value]
    if empty:
        raise ValueError(f"-o {empty[0]}=: give a value ({OPTION_HELP[empty[0]]})")
    values: dict[str, object] = {}

    stack_name = raw.get("stack_name") or default_stack_name(project_dir)
    if not STACK_NAME.match(stack_name):
        raise ValueError(
            f"stack name {stack_name!r}: must start with a letter and hold up to 28 letters, "
            "digits and -; pass -o stack_name=NAME"
        )
    if "region" in raw:
        if not REGION.match(raw["region"]):
            raise ValueError(f"-o region={raw['region']}: not a region name (e.g. eu-west-1)")
        values["region"] = raw["region"]
    if "profile" in raw:
        values["profile"] = raw["profile"]
    if "endpoint_url" in raw:
        if not raw["endpoint_url"].startswith(("http://", "https://")):
            raise ValueError(f"-o endpoint_url={raw['endpoint_url']}: not an http(s):// URL")
        values["endpoint_url"] = raw["endpoint_url"].rstrip("/")
    if "image" in raw:
        if not IMAGE.match(raw["image"]) or len(raw["image"]) > 255:
            raise ValueError(f"-o image={raw['image']}: not an image reference (REPO[:TAG])")
        values["image"] = raw["image"]
    if "base_image" in raw:
        if not IMAGE.match(raw["base_image"]) or len(raw["base_image"]) > 255:
            raise ValueError(f"-o base_image={raw['base_image']}: not an image reference")
        values["base_image"] = raw["base_image"]
    if "architecture" in raw:
        arch = raw["architecture"].lower().replace("amd64", "x86_64").replace("aarch64", "arm64")
        if arch not in ("x86_64", "arm64"):
            raise ValueError(f"-o architecture={raw['architecture']}: use x86_64 or arm64")
        values["architecture"] = arch

    cpu = to_int("-o task_cpu", raw.get("task_cpu", "256"), 256, 4096)
    if cpu not in FARGATE_SIZES:
        raise ValueError(f"-o task_cpu={cpu}: Fargate offers {', '.join(map(str, FARGATE_SIZES))}")
    memory = to_int("-o task_memory", raw.get("task_memory", str(FARGATE_SIZES[cpu][0])), 512, 30720)
    if memory not in FARGATE_SIZES[cpu]:
        choices = FARGATE_SIZES[cpu]
        offered = (", ".join(map(str, choices)) if len(choices) <= 4
                   else f"{choices[0]}..{choices[-1]} in steps of 1024")
        raise ValueError(f"-o task_memory={memory}: with task_cpu={cpu} Fargate offers {offered}")
    values["task_cpu"], values["task_memory"] = cpu, memory

    min_tasks = to_int("-o min_tasks", raw.get("min_tasks", "1"), 0, 100)
    max_tasks = to_int("-o max_tasks", raw.get("max_tasks", str(max(4, min_tasks))), 1, 100)
    if max_tasks < min_tasks:
        raise ValueError(f"-o max_tasks={max_tasks} is below min_tasks={min_tasks}")
    values["min_tasks"], values["max_tasks"] = min_tasks, max_tasks

    if "connections_per_task" in raw:
        values["connections_per_task"] = to_int(
            "-o connections_per_task", raw["connections_per_task"], 10, 1_000_000)
    if "cache_node_type" in raw:
        if not CACHE_NODE.match(raw["cache_node_type"]):
            raise ValueError(
                f"-o cache_node_type={raw['cache_node_type']}: not a node type (e.g. cache.t4g.micro)"
            )
        values["cache_node_type"] = raw["cache_node_type"]
    if "cache_replicas" in raw:
        values["cache_replicas"] = to_int("-o cache_replicas", raw["cache_replicas"], 0, 5)
    if "redis_url" in raw:
        url = raw["redis_url"]
        if url == REDIS_URL_STORED:  # remembered: the value lives in Secrets Manager only
            values["redis_url_secret"] = True
        else:
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError("-o redis_url: not a redis:// or rediss:// URL")
            values["redis_url"] = url
            values["redis_url_secret"] = has_credentials(url)
    if ("vpc_id" in raw) != ("subnet_ids" in raw):
        raise ValueError("-o vpc_id and -o subnet_ids go together: the VPC and two or more of "
                         "its subnets (e.g. -o subnet_ids=subnet-aaa,subnet-bbb)")
    if "vpc_id" in raw:
        if not VPC.match(raw["vpc_id"]):
            raise ValueError(f"-o vpc_id={raw['vpc_id']}: not a VPC id (vpc-0123abcd...)")
        subnets = tuple(dict.fromkeys(s.strip() for s in raw["subnet_ids"].split(",") if s.strip()))
        bad = [s for s in subnets if not SUBNET.match(s)]
        if bad:
            raise ValueError(f"-o subnet_ids: {bad[0]!r} is not a subnet id (subnet-0123abcd...)")
        if len(subnets) < 2:
            raise ValueError("-o subnet_ids: give at least two subnets, in different availability"
                             " zones (the load balancer needs two)")
        values["vpc_id"], values["subnet_ids"] = raw["vpc_id"], subnets
    if "long_polling" in raw:
        values["long_polling"] = to_bool("-o long_polling", raw["long_polling"])
    if "domain" in raw:
        domain = raw["domain"].lower().rstrip(".")
        if not HOSTNAME.match(domain):
            raise ValueError(f"-o domain={raw['domain']}: not a host name (e.g. chat.example.com)")
        values["domain"] = domain
    if "hosted_zone_id" in raw:
        if not HOSTED_ZONE.match(raw["hosted_zone_id"]):
            raise ValueError(
                f"-o hosted_zone_id={raw['hosted_zone_id']}: not a Route 53 hosted zone id "
                "(Z followed by capitals and digits, `aws route53 list-hosted-zones`)")
        values["hosted_zone_id"] = raw["hosted_zone_id"]
    if "allow_http" in raw:
        values["allow_http"] = to_bool("-o allow_http", raw["allow_http"])
    if "certificate_arn" in raw:
        if not CERTIFICATE.match(raw["certificate_arn"]):
            raise ValueError(
                f"-o certificate_arn={raw['certificate_arn']}: not an ACM certificate ARN"
            )
        values["certificate_arn"] = raw["certificate_arn"]
    if "timeout" in raw:
        values["timeout_minutes"] = to_int("-o timeout", raw["timeout"], 1, 180)
    return AwsOptions(stack_name=stack_name, **values)  # type: ignore[arg-type]
