"""``echoctl deploy|status|teardown --target aws``: one CloudFormation stack plus what lives beside it.

Inside the stack (:mod:`echo.targets.aws.template`): network, load balancer, ECS service,
Redis, bucket, roles. Beside it, managed here with boto3 because each has a life of its own:

- the **JWT secret** in Secrets Manager (``echo/STACK/jwt-secret``): generated once, kept
  across deploys, passed to the stack as an ARN; its value is never in the template, the
  state file or the output;
- the **server image** in ECR (built and pushed by :mod:`echo.targets.aws.image`, or ``-o
  image=URI``);
- the **functions** on Lambda (``STACK_NAME``): deployed with :class:`LambdaDeployer`, so
  ``echoctl functions deploy --target aws`` updates one function without touching the stack,
  and a deploy updates only functions whose zip changed;
- **associations.json** in the stack's bucket, also PUT to the live endpoint.

The options of the last deploy are remembered in ``.echo/targets/aws.json``, so ``status``,
``teardown``, ``jwt`` and later deploys find the same stack without repeating them.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from echo.aws import aws_client
from echo.config import Settings
from echo.core.associations import Associations, AssociationsError, parse_associations_text
from echo.core.functions import FunctionConfigError, FunctionSpec, discover
from echo.extras import require
from echo.packaging import PackagingError, build_zip
from echo.runners.lambda_deploy import LambdaDeployer
from echo.targets.aws.deploy import StackDeployer
from echo.targets.aws.options import OPTION_HELP, REDIS_URL_STORED, AwsOptions, parse_options
from echo.targets.aws.template import ASSOCIATIONS_KEY, ecr_repository_arn, render
from echo.targets.base import Outputs, Progress, Target, TargetError

T = TypeVar("T")
LAMBDA_NAME_MAX = 64
ROLE_PROPAGATION_WAIT = 90  # seconds: a new IAM role can take a while before Lambda may use it
LIVE_PUT_TIMEOUT = 10
REMEMBERED = tuple(OPTION_HELP)  # every option given to deploy holds until given again


def _aws_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turn AWS and project errors into a TargetError with a next step (never a traceback)."""

    @functools.wraps(method)
    def wrapper(self: AwsTarget, *args: Any, **kwargs: Any) -> T:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
        )
        from botocore.parsers import ResponseParserError  # not a BotoCoreError

        try:
            return method(self, *args, **kwargs)
        except NoCredentialsError:
            raise TargetError(
                "no AWS credentials found: run `aws configure` (or `aws sso login`), set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or pass -o profile=NAME") from None
        except NoRegionError:
            raise TargetError("no AWS region: pass -o region=REGION") from None
        except EndpointConnectionError as exc:
            raise TargetError(
                f"cannot reach AWS at {exc.kwargs.get('endpoint_url', '?')}: check the network"
                " or -o endpoint_url") from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = error.get("Code", "?"), error.get("Message", str(exc))
            hint = ("check the identity's permissions (`aws sts get-caller-identity`)"
                    if "AccessDenied" in code or "Unauthorized" in code or "Token" in code
                    else "fix the cause and run the command again")
            raise TargetError(f"AWS refused {exc.operation_name} ({code}): {message}; {hint}") \
                from None
        except BotoCoreError as exc:
            raise TargetError(f"AWS call failed: {exc}; run the command again") from None
        except ResponseParserError:  # an HTML error page from a proxy or an emulator, say
            raise TargetError(
                f"AWS answered with something that is not an AWS reply (at "
                f"{self.opts.endpoint_url or self.region}); check -o endpoint_url or the "
                "network's proxy, then run the command again") from None
        except (FunctionConfigError, PackagingError) as exc:
            raise TargetError(f"{exc}; fix the function and run the command again") from None
        except AssociationsError as exc:
            raise TargetError(
                f"{self.settings.associations}: {exc}; check it with `echoctl associations check`"
            ) from None

    return wrapper


class AwsTarget(Target):
    name = "aws"

    def __init__(self, settings: Settings, options: dict[str, str]) -> None:
        super().__init__(settings, options)
        remembered = self.load_state().get("options", {})
        merged = {**remembered, **options}
        if merged.get("image") == "build":  # `-o image=build`: build again, forget the URI
            merged.pop("image")
        self.given = {k: v for k, v in merged.items() if k in REMEMBERED}
        self.opts: AwsOptions = parse_options(merged, settings.project_dir)
        if self.opts.redis_url_secret:  # the state file holds no password: the secret does
            self.given["redis_url"] = REDIS_URL_STORED
        boto3 = require("boto3", "aws", "the AWS target")
        from botocore.exceptions import ProfileNotFound

        try:
            self.session = boto3.session.Session(profile_name=self.opts.profile)
        except ProfileNotFound:
            raise ValueError(
                f"-o profile={self.opts.profile}: no such profile (list them with "
                "`aws configure list-profiles`)") from None
        self.region = self.opts.region or self.session.region_name or settings.aws_region
        self.poll = 0.2 if self.opts.endpoint_url else 5.0
        self._clients: dict[str, Any] = {}

    # -- plumbing ------------------------------------------------------------------------

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = aws_client(
                service, region=self.region, endpoint_url=self.opts.endpoint_url,
                session=self.session, connect_timeout=10, read_timeout=120,
                retries={"max_attempts": 5, "mode": "standard"})
        return self._clients[service]

    def stack(self, progress: Progress) -> StackDeployer:
        return StackDeployer(self.client("cloudformation"), self.opts.stack_name, progress,
                             timeout=self.opts.timeout_minutes * 60, poll=self.poll)

    @property
    def secret_name(self) -> str:
        return f"echo/{self.opts.stack_name}/jwt-secret"

    @property
    def redis_url_secret_name(self) -> str:
        return f"echo/{self.opts.stack_name}/redis-url"

    @property
    def repository(self) -> str:
        return self.opts.stack_name.lower()

    def _require_safe_exposure(self, progress: Progress) -> None:
        """Refuse an endpoint whose tokens would cross the internet in clear, unless asked;
        when asked (``allow_http``), say so on every deploy, so no one forgets it is on."""
        problem = self.opts.exposure_problem()
        if problem:
            raise TargetError(problem)
        if not self.opts.https:
            progress("warning: -o allow_http=true: plain HTTP on the load balancer's own name; "
                     "tokens and messages cross the network in clear (test deployments only)")

    def _check_network(self, progress: Progress) -> None:
        """Your VPC's subnets, checked before anything is created: a wrong id, a subnet of
        another VPC or one AZ only would fail the stack minutes in. A subnet without a route
        to an internet gateway is only warned about (the internet-facing ALB would be
        unreachable there, unless the route goes through a firewall endpoint)."""
        if not self.opts.vpc_id:
            return
        ec2, vpc, wanted = self.client("ec2"), self.opts.vpc_id, list(self.opts.subnet_ids)
        listing = f"`aws ec2 describe-subnets --filters Name=vpc-id,Values={vpc}`"
        # a filter, not SubnetIds=: an unknown id is then missing from the answer, not an error
        subnets = ec2.describe_subnets(
            Filters=[{"Name": "subnet-id", "Values": wanted}])["Subnets"]
        missing = [s for s in wanted if s not in {subnet["SubnetId"] for subnet in subnets}]
        if missing:
            raise TargetError(f"-o subnet_ids: no subnet {missing[0]} in {self.region}; list "
                              f"{vpc}'s subnets with {listing}")
        for subnet in subnets:
            if subnet["VpcId"] != vpc:
                raise TargetError(f"-o subnet_ids: {subnet['SubnetId']} is in {subnet['VpcId']}"
                                  f", not {vpc}; list {vpc}'s subnets with {listing}")
        zones = sorted({subnet["AvailabilityZone"] for subnet in subnets})
        if len(zones) < 2:
            raise TargetError(f"-o subnet_ids: all in {zones[0]}; the load balancer needs "
                              f"subnets in two availability zones ({listing})")
        tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])
        main, by_subnet = None, {}
        for table in tables["RouteTables"]:
            for association in table.get("Associations", []):
                if association.get("Main"):
                    main = table
                elif association.get("SubnetId"):
                    by_subnet[association["SubnetId"]] = table
        for subnet in wanted:
            table = by_subnet.get(subnet, main)
            routes = table.get("Routes", []) if table else []
            if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0"
                       and str(r.get("GatewayId", "")).startswith("igw-") for r in routes):
                progress(f"warning: -o subnet_ids: {subnet} has no 0.0.0.0/0 route to an "
                         "internet gateway; the internet-facing load balancer needs public "
                         "subnets")

    def _require_deployment(self) -> dict[str, Any]:
        details = self.load_state().get("details", {})
        if not details.get("bucket"):
            raise TargetError(
                f"no aws deployment recorded in {self.state_path}; run "
                "`echoctl deploy --target aws` first")
        return details

    # -- the project ---------------------------------------------------------------------

    def lambda_specs(self, progress: Progress, names: Iterable[str] | None = None
                     ) -> list[FunctionSpec]:
        """Functions that run on Lambda here (``runner`` unset or ``lambda``)."""
        specs = discover(self.settings.path(self.settings.functions_dir),
                         self.settings.function_timeout)
        if names is not None:
            wanted = list(names)
            unknown = [n for n in wanted if n not in specs]
            if unknown:
                raise TargetError(
                    f"no function {unknown[0]!r} in {self.settings.functions_dir}/ "
                    f"(there: {', '.join(specs) or 'none'})")
            specs = {n: specs[n] for n in wanted}
        chosen = []
        for spec in specs.values():
            if spec.runner not in (None, "lambda"):
                progress(f"{spec.name}: runner {spec.runner!r}, not deployed to Lambda")
                continue
            full = self.opts.lambda_prefix + spec.name
            if len(full) > LAMBDA_NAME_MAX:
                raise TargetError(
                    f"Lambda name {full!r} is over {LAMBDA_NAME_MAX} characters; shorten the "
                    "function's name or pass a shorter -o stack_name")
            chosen.append(spec)
        return chosen

    def load_associations(self) -> Associations:
        path = self.settings.path(self.settings.associations)
        if not path.exists():
            return Associations.empty()
        return parse_associations_text(path.read_bytes(), source=path.name)

    # -- Target --------------------------------------------------------------------------

    @_aws_errors
    def synth(self, out: Path, progress: Progress) -> list[Path]:
        self._require_safe_exposure(progress)
        specs = self.lambda_specs(progress)
        self.load_associations()
        out.mkdir(parents=True, exist_ok=True)
        template = render(self.opts, self.opts.architecture or "x86_64", self._image_repo_arn())
        written = [out / "template.json", out / "parameters.json"]
        written[0].write_text(json.dumps(template, indent=2) + "\n", encoding="utf-8")
        image = self.opts.image or (
            f"<built at deploy: ACCOUNT.dkr.ecr.{self.region}.amazonaws.com/{self.repository}:IMAGE-ID>")
        parameters = [
            {"ParameterKey": "ImageUri", "ParameterValue": image},
            {"ParameterKey": "SecretArn",
             "ParameterValue": f"<created at deploy: Secrets Manager secret {self.secret_name}>"},
        ]
        if self.opts.redis_url_secret:
            parameters.append({"ParameterKey": "RedisUrlSecretArn", "ParameterValue":
                               f"<created at deploy: Secrets Manager secret "
                               f"{self.redis_url_secret_name}>"})
        written[1].write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
        manifest: dict[str, Any] = {"stack": self.opts.stack_name, "region": self.region,
                                    "lambdaPrefix": self.opts.lambda_prefix, "functions": {}}
        (out / "functions").mkdir(exist_ok=True)
        for spec in specs:
            package = build_zip(spec)
            path = out / "functions" / f"{spec.name}.zip"
            path.write_bytes(package.data)
            manifest["functions"][spec.name] = {
                "lambdaName": self.opts.lambda_prefix + spec.name, "sha256": package.sha256,
                "runtime": spec.runtime, "handler": spec.handler, "memory": spec.memory}
            written.append(path)
        written.append(out / "manifest.json")
        written[-1].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        progress(f"synthesized stack {self.opts.stack_name} and {len(specs)} function zip(s); "
                 "nothing was deployed")
        return written

    @_aws_errors
    def deploy(self, progress: Progress) -> Outputs:
        self._require_safe_exposure(progress)
        self._check_network(progress)
        started = time.monotonic()
        specs = self.lambda_specs(progress)
        associations = self.load_associations()
        if self.opts.image:
            image, architecture = self.opts.image, self.opts.architecture or "x86_64"
            progress(f"using image {image}")
        else:
            from echo.targets.aws.image import build_and_push

            image, architecture = build_and_push(self.client("ecr"), self.settings,
                                                 self.repository, self.opts.base_image, progress)
        secret_arn = self._ensure_secret(progress)
        redis_secret_arn = self._sync_redis_url_secret(progress)
        parameters = {"ImageUri": image, "SecretArn": secret_arn,
                      **({"RedisUrlSecretArn": redis_secret_arn} if redis_secret_arn else {})}
        # recorded before the stack exists, so teardown finds whatever a failed deploy left
        previous = self.load_state()
        self.save_state({**previous, "options": self.given, "details": {
            **previous.get("details", {}), "stack": self.opts.stack_name, "region": self.region,
            "secretArn": secret_arn}})
        template = render(self.opts, architecture, self._image_repo_arn())
        stack = self.stack(progress)
        outcome = stack.apply(template, parameters, {"echo:deployment": self.opts.stack_name})
        if not redis_secret_arn:  # one from an earlier password URL: unused once the stack is
            self._delete_secret(self.redis_url_secret_name, progress)
        outputs = stack.outputs()
        details = {
            "stack": self.opts.stack_name, "region": self.region,
            "bucket": outputs["BucketName"], "prefix": self.opts.lambda_prefix,
            "secretArn": secret_arn, "cluster": outputs.get("ClusterName"),
            "service": outputs.get("ServiceName"), "functionRoleArn": outputs["FunctionRoleArn"],
            "image": image, "logGroup": outputs.get("LogGroupName"),
            **({"repository": self.repository} if not self.opts.image else {}),
        }
        endpoint = outputs["Endpoint"]
        if self.opts.domain and not self.opts.hosted_zone_id:
            progress(f"point {self.opts.domain} at {outputs.get('LoadBalancerDNSName')} (CNAME, "
                     f"or an alias A record in Route 53): clients connect to {endpoint}")
        # recorded now, so teardown finds the stack even if a later step fails
        self.save_state({"endpoint": endpoint, "details": details, "options": self.given})
        changed, removed = self._sync_functions(specs, details["functionRoleArn"], progress)
        associations_note = self._store_associations(associations, details["bucket"],
                                                     endpoint, secret_arn, progress, force=False)
        self.save_state({"endpoint": endpoint, "details": details, "options": self.given})
        progress(f"stack {outcome}; functions updated: {', '.join(changed) or 'none'}"
                 f"{'; removed: ' + ', '.join(removed) if removed else ''}; associations: "
                 f"{associations_note} ({time.monotonic() - started:.1f}s)")
        return Outputs(endpoint, None, details)

    @_aws_errors
    def status(self) -> dict[str, Any]:
        stack = self.stack(lambda _: None).describe()
        state = self.load_state()
        if stack is None and not state:
            return {}
        result: dict[str, Any] = {"stack": self.opts.stack_name, "region": self.region,
                                  "status": stack["StackStatus"] if stack else "NOT_FOUND"}
        if stack is None:
            return result
        if stack.get("StackStatusReason"):
            result["reason"] = stack["StackStatusReason"]
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        result["endpoint"] = outputs.get("Endpoint")
        result["outputs"] = outputs
        result["secretArn"] = state.get("details", {}).get("secretArn")
        if outputs.get("ClusterName") and outputs.get("ServiceName"):
            services = self.client("ecs").describe_services(
                cluster=outputs["ClusterName"], services=[outputs["ServiceName"]])["services"]
            if services:
                service = services[0]
                result["service"] = {
                    "name": service.get("serviceName"), "status": service.get("status"),
                    "desired": service.get("desiredCount"), "running": service.get("runningCount"),
                    "pending": service.get("pendingCount"),
                    "taskDefinition": service.get("taskDefinition")}
        result["functions"] = self.function_status()
        return result

    @_aws_errors
    def teardown(self, progress: Progress) -> None:
        details = self.load_state().get("details", {})
        stack = self.stack(progress)
        removed = self._deployer("").destroy(sorted(self._deployer("").deployed()), progress)
        if removed:
            progress(f"deleted {len(removed)} function(s)")
        bucket = details.get("bucket") or stack.outputs().get("BucketName")
        if bucket:
            self._empty_bucket(bucket, progress)
        had_stack = stack.delete()
        logs = self.client("logs")
        for page in logs.get_paginator("describe_log_groups").paginate(
                logGroupNamePrefix=f"/aws/lambda/{self.opts.lambda_prefix}"):
            for group in page["logGroups"]:
                progress(f"deleting log group {group['logGroupName']}")
                logs.delete_log_group(logGroupName=group["logGroupName"])
        for name in (self.secret_name, self.redis_url_secret_name):
            self._delete_secret(name, progress)
        self._delete_repository(progress)
        if not (had_stack or removed or details):
            progress(f"nothing deployed as {self.opts.stack_name} in {self.region}")
        self.forget_state()

    @_aws_errors
    def push_associations(self, associations: Associations, progress: Progress) -> None:
        details = self._require_deployment()
        state = self.load_state()
        self._store_associations(associations, details["bucket"], state["endpoint"],
                                 details["secretArn"], progress, force=True)

    @_aws_errors
    def outputs(self) -> Outputs:
        state = self.load_state()
        details = self._require_deployment()
        value = self.client("secretsmanager").get_secret_value(
            SecretId=details["secretArn"])["SecretString"]
        return Outputs(state["endpoint"], value, details)

    # -- functions (`echoctl functions deploy|status|destroy --target aws`) ------------

    @_aws_errors
    def deploy_functions(self, names: list[str] | None, progress: Progress) -> list[str]:
        """Create or update the named functions (all when None); return those that changed."""
        details = self._require_deployment()
        specs = self.lambda_specs(progress, names or None)
        changed, _ = self._sync_functions(specs, details["functionRoleArn"], progress,
                                          remove_stale=False)
        return changed

    @_aws_errors
    def function_status(self) -> dict[str, Any]:
        """Each function: its deployed code's SHA-256, the local zip's, and whether they match."""
        deployed = self._deployer("").deployed()
        local = {spec.name: build_zip(spec).sha256 for spec in self.lambda_specs(lambda _: None)}
        result: dict[str, Any] = {}
        for name in sorted(set(deployed) | set(local)):
            config = deployed.get(name)
            remote = base64.b64decode(config["CodeSha256"]).hex() if config else None
            state = ("not deployed" if remote is None else "not in project" if name not in local
                     else "up to date" if remote == local[name] else "changed locally")
            result[name] = {"lambdaName": self.opts.lambda_prefix + name, "sha256": remote,
                            "localSha256": local.get(name), "state": state,
                            **({"lastModified": config.get("LastModified")} if config else {})}
        return result

    @_aws_errors
    def destroy_functions(self, names: list[str], progress: Progress) -> list[str]:
        return self._deployer("").destroy(names, progress)

    # -- helpers -------------------------------------------------------------------------

    def _image_repo_arn(self) -> Any:
        if self.opts.image:
            return ecr_repository_arn(self.opts.image)
        return {"Fn::Sub": "arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}"
                           f":repository/{self.repository}"}

    def _deployer(self, role_arn: str) -> LambdaDeployer:
        return LambdaDeployer(self.client("lambda"), self.opts.lambda_prefix, role_arn)

    def _delete_repository(self, progress: Progress) -> None:
        """The ECR repository deploy created (tagged as this deployment's), images and all."""
        ecr = self.client("ecr")
        try:
            repository = ecr.describe_repositories(repositoryNames=[self.repository])[
                "repositories"][0]
        except ecr.exceptions.RepositoryNotFoundException:
            return
        tags = ecr.list_tags_for_resource(resourceArn=repository["repositoryArn"]).get("tags", [])
        if {"Key": "echo:deployment", "Value": self.repository} not in tags:
            progress(f"kept ECR repository {self.repository}: deploy did not create it")
            return
        ecr.delete_repository(repositoryName=self.repository, force=True)
        progress(f"deleted ECR repository {self.repository}")

    def _ensure_secret(self, progress: Progress) -> str:
        """The deployment's JWT secret: created once with a random value, then kept."""
        client = self.client("secretsmanager")
        try:
            described = client.describe_secret(SecretId=self.secret_name)
        except client.exceptions.ResourceNotFoundException:
            created = client.create_secret(
                Name=self.secret_name, SecretString=secrets.token_urlsafe(48),
                Description=f"Echo {self.opts.stack_name}: HS256 key of the JWTs",
                Tags=[{"Key": "echo:deployment", "Value": self.opts.stack_name}])
            progress(f"created secret {self.secret_name} (value not shown)")
            return str(created["ARN"])
        if described.get("DeletedDate"):
            client.restore_secret(SecretId=self.secret_name)
            progress(f"restored secret {self.secret_name}, which was scheduled for deletion")
        return str(described["ARN"])

    def _delete_secret(self, name: str, progress: Progress) -> bool:
        """Delete a secret now (no recovery window: teardown means gone); False if none."""
        client = self.client("secretsmanager")
        try:
            client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        except client.exceptions.ResourceNotFoundException:
            return False
        progress(f"deleted secret {name}")
        return True

    def _sync_redis_url_secret(self, progress: Progress) -> str | None:
        """A redis_url with a password goes to Secrets Manager (ECS injects it), so it is in
        neither the template nor the task definition; return its ARN (None when not needed).

        Written only when the value differs, so a deploy with nothing changed stays a no-op.
        """
        name = self.redis_url_secret_name
        if not self.opts.redis_url_secret:
            return None
        client = self.client("secretsmanager")
        try:
            described = client.describe_secret(SecretId=name)
        except client.exceptions.ResourceNotFoundException:
            if self.opts.redis_url is None:
                raise TargetError(
                    f"secret {name} holding the Redis URL is gone; pass -o redis_url=URL "
                    "again") from None
            created = client.create_secret(
                Name=name, SecretString=self.opts.redis_url,
                Description=f"Echo {self.opts.stack_name}: the server's Redis URL (with password)",
                Tags=[{"Key": "echo:deployment", "Value": self.opts.stack_name}])
            progress(f"stored the Redis URL in secret {name} (value not shown)")
            return str(created["ARN"])
        if described.get("DeletedDate"):
            client.restore_secret(SecretId=name)
        if self.opts.redis_url is not None:
            current = client.get_secret_value(SecretId=name)["SecretString"]
            if current != self.opts.redis_url:
                client.put_secret_value(SecretId=name, SecretString=self.opts.redis_url)
                progress(f"updated the Redis URL in secret {name} (value not shown); running "
                         "tasks keep the old one until they are replaced")
        return str(described["ARN"])

    def _sync_functions(self, specs: list[FunctionSpec], role_arn: str, progress: Progress,
                        remove_stale: bool = True) -> tuple[list[str], list[str]]:
        from botocore.exceptions import ClientError

        deployer = self._deployer(role_arn)
        deadline = time.monotonic() + ROLE_PROPAGATION_WAIT
        while True:
            try:
                changed = deployer.deploy(specs, progress)
                break
            except ClientError as exc:
                # a role created moments ago may not be usable by Lambda yet
                if "cannot be assumed" not in str(exc) or time.monotonic() > deadline:
                    raise
                progress("waiting for the new function role to reach Lambda")
                time.sleep(5)
        removed: list[str] = []
        if remove_stale:
            stale = sorted(set(deployer.deployed()) - {spec.name for spec in specs})
            removed = deployer.destroy(stale, progress)
        return changed, removed

    def _empty_bucket(self, bucket: str, progress: Progress) -> None:
        s3 = self.client("s3")
        count = 0
        try:
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
                doomed = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                          for o in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                if doomed:
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
                    count += len(doomed)
        except s3.exceptions.NoSuchBucket:
            return
        progress(f"emptied bucket {bucket} ({count} object(s))")

    def _store_associations(self, associations: Associations, bucket: str, endpoint: str,
                            secret_arn: str, progress: Progress, force: bool) -> str:
        """Upload to the bucket when different (always when ``force``), then PUT it live."""
        body = (json.dumps(associations.document, indent=2, ensure_ascii=False) + "\n").encode()
        digest = hashlib.sha256(body).hexdigest()
        s3 = self.client("s3")
        if not force:
            try:
                head = s3.head_object(Bucket=bucket, Key=ASSOCIATIONS_KEY)
                if head.get("Metadata", {}).get("sha256") == digest:
                    return "unchanged"
            except s3.exceptions.ClientError:
                pass
        s3.put_object(Bucket=bucket, Key=ASSOCIATIONS_KEY, Body=body,
                      ContentType="application/json", Metadata={"sha256": digest})
        progress(f"uploaded associations to s3://{bucket}/{ASSOCIATIONS_KEY}")
        secret = self.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"]
        applied = self._put_live(endpoint, body, secret, progress)
        return "uploaded to S3 and applied live" if applied else "uploaded to S3 only"

    def _put_live(self, endpoint: str, body: bytes, secret: str, progress: Progress) -> bool:
        """PUT /associations on the running service, if it answers; say what happened."""
        from echo import management

        later = "running tasks keep their document; tasks load the uploaded copy when they start"
        host = urlsplit(endpoint).hostname or ""
        if not _resolves(host):
            progress(f"not applied live: {endpoint} does not resolve from here; {later}")
            return False
        try:
            reply = management.put_associations(endpoint, json.loads(body), secret,
                                                timeout=LIVE_PUT_TIMEOUT)
        except management.Unreachable as exc:
            progress(f"not applied live: {endpoint} did not answer ({exc}); "
                     f"{later}; run `echoctl associations push --target aws` once it is up")
            return False
        except management.ManagementError as exc:
            progress(f"not applied live: {endpoint} refused it ({exc.status}: "
                     f"{exc.body[:200]}); {later}")
            return False
        progress(f"applied live on {endpoint} (version {reply.get('version')})")
        return True


def _resolves(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` resolves within ``timeout`` (getaddrinfo itself has no timeout)."""
    if not host:
        return False
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(socket.getaddrinfo, host, 80).result(timeout=timeout)
        return True
    except (concurrent.futures.TimeoutError, OSError):
        return False
    finally:
        pool.shutdown(wait=False)
