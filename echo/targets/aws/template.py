"""The CloudFormation template of one Echo deployment, as plain Python data.

Plain dicts rather than troposphere: the template is one function of the options, easy to
read next to AWS's resource reference, and adds no dependency. ``json.dumps(render(...))``
is byte-for-byte the same for the same options, so a re-deploy with no change is an update
CloudFormation recognises as "No updates are to be performed".

Two values are known only at deploy time and are stack parameters: the server image and
the ARN of the JWT secret (created in Secrets Manager by the deployer, never in here).

What it creates (see the README's "Deploy to AWS"):

- a VPC over two availability zones with two public subnets and an internet gateway; the
  ALB and the Fargate tasks sit in them (tasks get a public IP to pull their image, but
  their security group only admits the ALB), so there is no NAT gateway to pay for;
- an internet-facing ALB: idle timeout above Socket.IO's ping interval + timeout, health
  check on ``/health`` (liveness: a Redis blip must not replace every task), a sticky target
  group when long-polling is on;
- an ECS cluster and a Fargate service running the server (``echoctl serve`` through
  :mod:`echo.targets.aws.bootstrap`), with CPU and connections target-tracking autoscaling and
  the deployment circuit breaker (a broken image fails the stack instead of hanging it);
- ElastiCache Redis (TLS, AUTH token from Secrets Manager, a replica in another AZ by
  default) reachable only from the tasks, unless ``redis_url`` is given;
- an S3 bucket (private, encrypted) holding ``associations.json``;
- IAM roles: the task role may invoke only ``PREFIX*`` functions and read/write only the
  bucket; the execution role may read only the secret, pull only the image's repository
  and write only the log group; the Lambda role may only write its functions' logs.
"""

from __future__ import annotations

from typing import Any

from echo.targets.aws import metrics_emitter
from echo.targets.aws.options import AwsOptions

CONTAINER = "echo"
PORT = 3000
ASSOCIATIONS_KEY = "associations.json"
# python-socketio's defaults: a ping every 25 s, a client gone after 20 s more without a pong.
SOCKETIO_PING_INTERVAL, SOCKETIO_PING_TIMEOUT = 25, 20
DEREGISTRATION_DELAY = 45
# SIGTERM to SIGKILL. Echo's shutdown takes at most ~18 s (10 s for in-flight messages,
# 3 s of flushes, uvicorn's 5 s); ECS's default of 30 s leaves a slow, loaded task little
# room when drain_watch could not start the drain first
STOP_TIMEOUT = 60
ALB_IDLE_TIMEOUT = 120  # must exceed 45 s, or the ALB cuts quiet websockets between pings
# no memory target: memory never falls in a Python process, so it would never scale in
CPU_TARGET = 60.0
CACHE_AUTH_TOKEN = "{{resolve:secretsmanager:${CacheAuthSecret}:SecretString}}"
# TLS (rediss://) and AUTH; CloudFormation resolves the token when it creates the secret
CACHE_URL = ("rediss://:" + CACHE_AUTH_TOKEN
             + "@${CacheGroup.PrimaryEndPoint.Address}:${CacheGroup.PrimaryEndPoint.Port}/0")

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"Ref": name}


def _att(name: str, attribute: str) -> Json:
    return {"Fn::GetAtt": [name, attribute]}


def _sub(text: str) -> Json:
    return {"Fn::Sub": text}


def _tags(opts: AwsOptions, name: str) -> list[Json]:
    return [{"Key": "Name", "Value": f"{opts.stack_name}-{name}"},
            {"Key": "echo:deployment", "Value": opts.stack_name}]


def _policy(name: str, statements: list[Json]) -> Json:
    return {"PolicyName": name,
            "PolicyDocument": {"Version": "2012-10-17", "Statement": statements}}


def _trust(service: str) -> Json:
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]}


def ecr_repository_arn(image: str) -> str | None:
    """``ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG`` -> the repository's ARN (else None)."""
    registry, _, path = image.partition("/")
    parts = registry.split(".")
    if len(parts) < 6 or parts[1:3] != ["dkr", "ecr"] or not path:
        return None
    repository = path.split("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    partition = "aws-cn" if registry.endswith(".cn") else "aws"
    return f"arn:{partition}:ecr:{parts[3]}:{parts[0]}:repository/{repository}"


def _vpc(opts: AwsOptions) -> Any:
    """The VPC everything sits in: the user's (``vpc_id``) or the stack's own."""
    return opts.vpc_id or _ref("Vpc")


def _subnets(opts: AwsOptions) -> list[Any]:
    """Subnets of the ALB, the tasks and the cache: the user's or the stack's two."""
    if opts.vpc_id:
        return list(opts.subnet_ids)
    return [_ref("PublicSubnetA"), _ref("PublicSubnetB")]


def _network(opts: AwsOptions) -> Json:
    if opts.vpc_id:  # the user's VPC: its subnets, routes and gateways are theirs
        return {}
    resources: Json = {
        "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {
            "CidrBlock": "10.40.0.0/16", "EnableDnsSupport": True, "EnableDnsHostnames": True,
            "Tags": _tags(opts, "vpc")}},
        "InternetGateway": {"Type": "AWS::EC2::InternetGateway",
                            "Properties": {"Tags": _tags(opts, "igw")}},
        "GatewayAttachment": {"Type": "AWS::EC2::VPCGatewayAttachment", "Properties": {
            "VpcId": _ref("Vpc"), "InternetGatewayId": _ref("InternetGateway")}},
        "PublicRouteTable": {"Type": "AWS::EC2::RouteTable", "Properties": {
            "VpcId": _ref("Vpc"), "Tags": _tags(opts, "public")}},
        "PublicRoute": {"Type": "AWS::EC2::Route", "DependsOn": "GatewayAttachment",
                        "Properties": {"RouteTableId": _ref("PublicRouteTable"),
                                       "DestinationCidrBlock": "0.0.0.0/0",
                                       "GatewayId": _ref("InternetGateway")}},
    }
    for index, letter in enumerate("AB"):
        resources[f"PublicSubnet{letter}"] = {"Type": "AWS::EC2::Subnet", "Properties": {
            "VpcId": _ref("Vpc"), "CidrBlock": f"10.40.{index}.0/24",
            "AvailabilityZone": {"Fn::Select": [index, {"Fn::GetAZs": ""}]},
            "MapPublicIpOnLaunch": False, "Tags": _tags(opts, f"public-{letter.lower()}")}}
        resources[f"PublicSubnet{letter}Routes"] = {
            "Type": "AWS::EC2::SubnetRouteTableAssociation",
            "Properties": {"SubnetId": _ref(f"PublicSubnet{letter}"),
                           "RouteTableId": _ref("PublicRouteTable")}}
    return resources


def _security_groups(opts: AwsOptions) -> Json:
    alb_ports = [80, 443] if opts.https else [80]
    resources: Json = {
        "LoadBalancerSecurityGroup": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
            "GroupDescription": f"{opts.stack_name}: HTTP(S) from anywhere to the load balancer",
            "VpcId": _vpc(opts),
            "SecurityGroupIngress": [
                {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "CidrIp": "0.0.0.0/0",
                 "Description": "clients" if port == 443 or not opts.https
                 else "clients, redirected to HTTPS"}
                for port in alb_ports],
            "Tags": _tags(opts, "alb")}},
        "TaskSecurityGroup": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
            "GroupDescription": f"{opts.stack_name}: the server port, from the load balancer only",
            "VpcId": _vpc(opts),
            "SecurityGroupIngress": [{
                "IpProtocol": "tcp", "FromPort": PORT, "ToPort": PORT,
                "Description": "the load balancer",
                "SourceSecurityGroupId": _att("LoadBalancerSecurityGroup", "GroupId")}],
            "Tags": _tags(opts, "tasks")}},
    }
    if not opts.own_redis:
        resources["CacheSecurityGroup"] = {"Type": "AWS::EC2::SecurityGroup", "Properties": {
            "GroupDescription": f"{opts.stack_name}: Redis, from the server tasks only",
            "VpcId": _vpc(opts),
            "SecurityGroupIngress": [{
                "IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379,
                "Description": "the server tasks",
                "SourceSecurityGroupId": _att("TaskSecurityGroup", "GroupId")}],
            "Tags": _tags(opts, "cache")}}
    return resources


def _cache(opts: AwsOptions) -> Json:
    """ElastiCache Redis with TLS, AUTH and (by default) a replica in another AZ.

    The AUTH token is generated by Secrets Manager inside the stack and handed to ElastiCache
    by a dynamic reference, so no one ever sees it; the server's URL (token included) is a
    second secret, given to the task by ECS, never as a plain environment variable.
    """
    if opts.own_redis:
        return {}
    failover = opts.cache_replicas > 0
    return {
        "CacheSubnetGroup": {"Type": "AWS::ElastiCache::SubnetGroup", "Properties": {
            "Description": f"{opts.stack_name}: Redis subnets",
            "SubnetIds": _subnets(opts)}},
        "CacheAuthSecret": {"Type": "AWS::SecretsManager::Secret", "Properties": {
            "Description": f"{opts.stack_name}: AUTH token of the ElastiCache Redis",
            # ElastiCache tokens: 16-128 printable characters without @ " /
            "GenerateSecretString": {"PasswordLength": 32, "ExcludePunctuation": True},
            "Tags": _tags(opts, "redis-auth")}},
        # not "Cache", the single CacheCluster of earlier versions: CloudFormation cannot change
        # a resource's type in place, so an update creates this and then deletes that one
        "CacheGroup": {"Type": "AWS::ElastiCache::ReplicationGroup", "Properties": {
            "ReplicationGroupDescription": f"{opts.stack_name}: Echo's Redis",
            "Engine": "redis", "CacheNodeType": opts.cache_node_type, "Port": 6379,
            "NumCacheClusters": opts.cache_replicas + 1,
            "AutomaticFailoverEnabled": failover, "MultiAZEnabled": failover,
            "TransitEncryptionEnabled": True, "AtRestEncryptionEnabled": True,
            "AuthToken": _sub(CACHE_AUTH_TOKEN),
            "CacheSubnetGroupName": _ref("CacheSubnetGroup"),
            "SecurityGroupIds": [_att("CacheSecurityGroup", "GroupId")],
            "Tags": _tags(opts, "redis")}},
        "CacheUrlSecret": {"Type": "AWS::SecretsManager::Secret", "Properties": {
            "Description": f"{opts.stack_name}: the server's rediss:// URL (with the token)",
            "SecretString": _sub(CACHE_URL),
            "Tags": _tags(opts, "redis-url")}},
    }


def _storage(opts: AwsOptions) -> Json:
    return {
        "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True, "BlockPublicPolicy": True,
                "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
            "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
            "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
            # every PUT of associations.json is kept a month: an operator can go back
            "VersioningConfiguration": {"Status": "Enabled"},
            "LifecycleConfiguration": {"Rules": [{
                "Id": "old-associations", "Status": "Enabled",
                "NoncurrentVersionExpiration": {"NoncurrentDays": 30}}]},
            "Tags": _tags(opts, "associations")}},
        "LogGroup": {"Type": "AWS::Logs::LogGroup", "Properties": {
            "LogGroupName": f"/echo/{opts.stack_name}", "RetentionInDays": 14}},
    }


def _task_secrets(opts: AwsOptions) -> list[Json]:
    """What ECS injects at task start from Secrets Manager: never in the task definition."""
    secrets = [{"Name": "ECHO_SECRET", "ValueFrom": _ref("SecretArn")}]
    if not opts.own_redis:
        secrets.append({"Name": "ECHO_REDIS_URL", "ValueFrom": _ref("CacheUrlSecret")})
    elif opts.redis_url_secret:
        secrets.append({"Name": "ECHO_REDIS_URL", "ValueFrom": _ref("RedisUrlSecretArn")})
    return secrets


def _one_or_list(items: list[Any]) -> Any:
    """An IAM Resource: one ARN as itself (as before), several as a list."""
    return items[0] if len(items) == 1 else items


def _roles(opts: AwsOptions, image_repository_arn: str | Json | None) -> Json:
    prefix = opts.lambda_prefix
    pull: list[Json] = []
    if image_repository_arn:
        pull = [
            {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
            {"Effect": "Allow", "Resource": image_repository_arn, "Action": [
                "ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage",
                "ecr:GetDownloadUrlForLayer"]},
        ]
    lambda_logs = ("arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}"
                   f":log-group:/aws/lambda/{prefix}*")
    return {
        # used by ECS itself to start a task: pull the image, write logs, read the secret
        "ExecutionRole": {"Type": "AWS::IAM::Role", "Properties": {
            "Description": f"{opts.stack_name}: start the server tasks",
            "AssumeRolePolicyDocument": _trust("ecs-tasks.amazonaws.com"),
            "Policies": [_policy("start-tasks", [
                *pull,
                {"Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                 "Resource": _att("LogGroup", "Arn")},
                {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                 "Resource": _one_or_list([s["ValueFrom"] for s in _task_secrets(opts)])},
            ])]}},
        # used by the server: invoke this deployment's functions, read/write its bucket
        "TaskRole": {"Type": "AWS::IAM::Role", "Properties": {
            "Description": f"{opts.stack_name}: the running server",
            "AssumeRolePolicyDocument": _trust("ecs-tasks.amazonaws.com"),
            "Policies": [_policy("echo-server", [
                {"Effect": "Allow", "Action": "lambda:InvokeFunction", "Resource": _sub(
                    "arn:${AWS::Partition}:lambda:${AWS::Region}:${AWS::AccountId}"
                    f":function:{prefix}*")},
                {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
                 "Resource": _sub("${Bucket.Arn}/*")},
                {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": _att("Bucket", "Arn")},
                # drain_watch: is this task draining? (the action takes no resource ARN)
                {"Effect": "Allow", "Action": "elasticloadbalancing:DescribeTargetHealth",
                 "Resource": "*"},
            ])]}},
        # used by the functions: write their own logs, nothing else
        "FunctionRole": {"Type": "AWS::IAM::Role", "Properties": {
            "Description": f"{opts.stack_name}: echo functions (logs only)",
            "AssumeRolePolicyDocument": _trust("lambda.amazonaws.com"),
            "Policies": [_policy("function-logs", [
                {"Effect": "Allow", "Action": "logs:CreateLogGroup", "Resource": _sub(lambda_logs)},
                {"Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                 "Resource": _sub(lambda_logs + ":*")},
            ])]}},
    }


def _listeners(opts: AwsOptions) -> Json:
    """HTTPS on 443 with 80 redirecting to it when there is a domain; else HTTP on 80 only."""
    if not opts.https:
        return {
            "HttpListener": {"Type": "AWS::ElasticLoadBalancingV2::Listener", "Properties": {
                "LoadBalancerArn": _ref("LoadBalancer"), "Port": 80, "Protocol": "HTTP",
                "DefaultActions": [{"Type": "forward", "TargetGroupArn": _ref("TargetGroup")}]}},
        }
    certificate: Any = opts.certificate_arn or _ref("Certificate")
    return {
        "HttpsListener": {"Type": "AWS::ElasticLoadBalancingV2::Listener", "Properties": {
            "LoadBalancerArn": _ref("LoadBalancer"), "Port": 443, "Protocol": "HTTPS",
            "SslPolicy": "ELBSecurityPolicy-TLS13-1-2-2021-06",
            "Certificates": [{"CertificateArn": certificate}],
            "DefaultActions": [{"Type": "forward", "TargetGroupArn": _ref("TargetGroup")}]}},
        "HttpListener": {"Type": "AWS::ElasticLoadBalancingV2::Listener", "Properties": {
            "LoadBalancerArn": _ref("LoadBalancer"), "Port": 80, "Protocol": "HTTP",
            "DefaultActions": [{"Type": "redirect", "RedirectConfig": {
                "Protocol": "HTTPS", "Port": "443", "StatusCode": "HTTP_301"}}]}},
    }


def _dns(opts: AwsOptions) -> Json:
    """With a hosted zone: the domain's certificate (validated by DNS in that zone, so the
    stack needs no one to click an email) and an alias record from the domain to the ALB."""
    if not (opts.domain and opts.hosted_zone_id):
        return {}
    resources: Json = {
        "DnsRecord": {"Type": "AWS::Route53::RecordSet", "Properties": {
            "HostedZoneId": opts.hosted_zone_id, "Name": opts.domain, "Type": "A",
            "AliasTarget": {"DNSName": _att("LoadBalancer", "DNSName"),
                            "HostedZoneId": _att("LoadBalancer", "CanonicalHostedZoneID"),
                            "EvaluateTargetHealth": False}}},
    }
    if not opts.certificate_arn:
        resources["Certificate"] = {"Type": "AWS::CertificateManager::Certificate", "Properties": {
            "DomainName": opts.domain, "ValidationMethod": "DNS",
            "DomainValidationOptions": [{"DomainName": opts.domain,
                                         "HostedZoneId": opts.hosted_zone_id}],
            "Tags": _tags(opts, "certificate")}}
    return resources


def _scaling(opts: AwsOptions) -> Json:
    """Target tracking on CPU and on open connections per task (what a socket server carries;
    published by :mod:`echo.targets.aws.metrics_emitter`, averaged over the tasks)."""
    def policy(kind: str, target: float, metric: Json) -> Json:
        return {"Type": "AWS::ApplicationAutoScaling::ScalingPolicy", "Properties": {
            "PolicyName": f"{opts.stack_name}-{kind.lower()}",
            "PolicyType": "TargetTrackingScaling",
            "ScalingTargetId": _ref("ScalableTarget"),
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": target, **metric, "ScaleInCooldown": 120, "ScaleOutCooldown": 60}}}

    return {
        "CpuScaling": policy("Cpu", CPU_TARGET, {"PredefinedMetricSpecification": {
            "PredefinedMetricType": "ECSServiceAverageCPUUtilization"}}),
        "ConnectionsScaling": policy(
            "Connections", float(opts.connections_per_task), {"CustomizedMetricSpecification": {
                "Namespace": metrics_emitter.NAMESPACE, "MetricName": metrics_emitter.METRIC,
                "Dimensions": [{"Name": metrics_emitter.DIMENSION, "Value": opts.stack_name}],
                "Statistic": "Average", "Unit": "Count"}}),
    }


def _service(opts: AwsOptions, architecture: str) -> Json:
    environment = [
        {"Name": "ECHO_HOST", "Value": "0.0.0.0"},
        {"Name": "ECHO_PORT", "Value": str(PORT)},
        # a URL without credentials may be seen; one with them comes in through Secrets
        *([{"Name": "ECHO_REDIS_URL", "Value": opts.redis_url}]
          if opts.redis_url and not opts.redis_url_secret else []),
        {"Name": "ECHO_RUNNER", "Value": "lambda"},
        # every connection arrives from the load balancer's addresses: a per-IP cap would
        # cap the whole service
        {"Name": "ECHO_MAX_CONNECTIONS_PER_IP", "Value": "0"},
        # idle HTTP connections outlive the balancer's, so it never reuses one we closed (502)
        {"Name": "ECHO_KEEP_ALIVE_TIMEOUT", "Value": str(ALB_IDLE_TIMEOUT + 10)},
        {"Name": "ECHO_LAMBDA_PREFIX", "Value": opts.lambda_prefix},
        {"Name": "ECHO_AWS_REGION", "Value": _ref("AWS::Region")},
        {"Name": "ECHO_ASSOCIATIONS", "Value": "/app/associations.json"},
        {"Name": "ECHO_ASSOCIATIONS_S3", "Value": _sub(f"s3://${{Bucket}}/{ASSOCIATIONS_KEY}")},
        # the dimension the connections metric is published under (see _scaling)
        {"Name": metrics_emitter.SERVICE_ENV, "Value": opts.stack_name},
        # drain_watch starts Echo's drain when the ALB starts draining this task
        {"Name": "ECHO_TARGET_GROUP_ARN", "Value": _ref("TargetGroup")},
    ]
    subnets = _subnets(opts)
    listeners = _listeners(opts)
    return {
        "LoadBalancer": {"Type": "AWS::ElasticLoadBalancingV2::LoadBalancer", "Properties": {
            "Type": "application", "Scheme": "internet-facing", "Subnets": subnets,
            "SecurityGroups": [_att("LoadBalancerSecurityGroup", "GroupId")],
            "LoadBalancerAttributes": [
                {"Key": "idle_timeout.timeout_seconds", "Value": str(ALB_IDLE_TIMEOUT)},
                {"Key": "routing.http.drop_invalid_header_fields.enabled", "Value": "true"}],
            "Tags": _tags(opts, "alb")}},
        "TargetGroup": {"Type": "AWS::ElasticLoadBalancingV2::TargetGroup", "Properties": {
            "VpcId": _vpc(opts), "TargetType": "ip", "Protocol": "HTTP", "Port": PORT,
            # liveness, not readiness: a Redis blip (an ElastiCache maintenance reboot) fails
            # /ready on every task at once, and ECS would replace them all, dropping every socket
            "HealthCheckPath": "/health", "HealthCheckProtocol": "HTTP",
            "HealthCheckIntervalSeconds": 15, "HealthCheckTimeoutSeconds": 5,
            "HealthyThresholdCount": 2, "UnhealthyThresholdCount": 3,
            "Matcher": {"HttpCode": "200"},
            "TargetGroupAttributes": [
                # the ALB keeps a draining task's sockets this long: drain_watch sees the
                # draining within 5 s and Echo's notice goes out within 10 s more
                {"Key": "deregistration_delay.timeout_seconds", "Value": str(DEREGISTRATION_DELAY)},
                {"Key": "stickiness.enabled", "Value": "true" if opts.long_polling else "false"},
                {"Key": "stickiness.type", "Value": "lb_cookie"},
                {"Key": "stickiness.lb_cookie.duration_seconds", "Value": "86400"}],
            "Tags": _tags(opts, "servers")}},
        **listeners,
        "Cluster": {"Type": "AWS::ECS::Cluster", "Properties": {
            "ClusterSettings": [{"Name": "containerInsights", "Value": "disabled"}],
            "Tags": _tags(opts, "cluster")}},
        "TaskDefinition": {"Type": "AWS::ECS::TaskDefinition", "Properties": {
            "Family": opts.stack_name,
            "Cpu": str(opts.task_cpu), "Memory": str(opts.task_memory),
            "NetworkMode": "awsvpc", "RequiresCompatibilities": ["FARGATE"],
            "RuntimePlatform": {"OperatingSystemFamily": "LINUX",
                                "CpuArchitecture": architecture.upper()},
            "ExecutionRoleArn": _att("ExecutionRole", "Arn"),
            "TaskRoleArn": _att("TaskRole", "Arn"),
            "ContainerDefinitions": [{
                "Name": CONTAINER, "Image": _ref("ImageUri"), "Essential": True,
                "Command": ["python", "-m", "echo.targets.aws.bootstrap"],
                # SIGTERM to SIGKILL: room for the drain when a task stops without draining
                "StopTimeout": STOP_TIMEOUT,
                "PortMappings": [{"ContainerPort": PORT, "Protocol": "tcp"}],
                "Environment": environment,
                # the JWT secret: resolved by ECS at task start, never in here in plain text
                "Secrets": _task_secrets(opts),
                "LogConfiguration": {"LogDriver": "awslogs", "Options": {
                    "awslogs-group": _ref("LogGroup"), "awslogs-region": _ref("AWS::Region"),
                    "awslogs-stream-prefix": "echo"}},
            }],
            "Tags": _tags(opts, "server")}},
        "Service": {"Type": "AWS::ECS::Service",
                    # tasks pull their image over the public route: it must exist first
                    "DependsOn": [*listeners, *([] if opts.vpc_id else ["PublicRoute"])],
                    "Properties": {
            "Cluster": _ref("Cluster"), "TaskDefinition": _ref("TaskDefinition"),
            # no DesiredCount: it would reset a scaled-out service to min_tasks on every deploy;
            # the scalable target's MinCapacity keeps at least min_tasks running
            "LaunchType": "FARGATE",
            "HealthCheckGracePeriodSeconds": 30,
            "DeploymentConfiguration": {
                "MinimumHealthyPercent": 100, "MaximumPercent": 200,
                "DeploymentCircuitBreaker": {"Enable": True, "Rollback": True}},
            "NetworkConfiguration": {"AwsvpcConfiguration": {
                "AssignPublicIp": "ENABLED", "Subnets": subnets,
                "SecurityGroups": [_att("TaskSecurityGroup", "GroupId")]}},
            "LoadBalancers": [{"ContainerName": CONTAINER, "ContainerPort": PORT,
                               "TargetGroupArn": _ref("TargetGroup")}],
            "Tags": _tags(opts, "service")}},
        "ScalableTarget": {"Type": "AWS::ApplicationAutoScaling::ScalableTarget", "Properties": {
            "ServiceNamespace": "ecs", "ScalableDimension": "ecs:service:DesiredCount",
            "ResourceId": _sub("service/${Cluster}/${Service.Name}"),
            "MinCapacity": opts.min_tasks, "MaxCapacity": opts.max_tasks}},
        **_scaling(opts),
    }


def render(opts: AwsOptions, architecture: str = "x86_64",
           image_repository_arn: str | Json | None = None) -> Json:
    """The template for ``opts``: same options, same template (so no-op updates stay no-ops)."""
    if not opts.domain:
        endpoint: Json = {"Description": "Where clients connect (plain HTTP: test deployments)",
                          "Value": _sub("http://${LoadBalancer.DNSName}")}
    elif opts.hosted_zone_id:
        endpoint = {"Description": "Where clients connect", "Value": f"https://{opts.domain}"}
    else:
        endpoint = {"Description": f"Where clients connect, once {opts.domain} points at the "
                                   "load balancer (CNAME or alias to LoadBalancerDNSName)",
                    "Value": f"https://{opts.domain}"}
    outputs: Json = {
        "Endpoint": endpoint,
        "LoadBalancerDNSName": {"Description": "Point the domain's DNS here",
                                "Value": _att("LoadBalancer", "DNSName")},
        "BucketName": {"Description": "Holds associations.json", "Value": _ref("Bucket")},
        "ClusterName": {"Value": _ref("Cluster")},
        "ServiceName": {"Value": _att("Service", "Name")},
        "FunctionRoleArn": {"Description": "Execution role of the Lambda functions",
                            "Value": _att("FunctionRole", "Arn")},
        "LambdaPrefix": {"Value": opts.lambda_prefix},
        "LogGroupName": {"Value": _ref("LogGroup")},
    }
    if not opts.own_redis:
        outputs["RedisAddress"] = {"Value": _att("CacheGroup", "PrimaryEndPoint.Address")}
    parameters: Json = {
        "ImageUri": {"Type": "String", "Description": "Echo server image"},
        "SecretArn": {"Type": "String",
                      "Description": "Secrets Manager secret holding the JWT secret"},
    }
    if opts.redis_url_secret:
        parameters["RedisUrlSecretArn"] = {
            "Type": "String", "Description": "Secrets Manager secret holding the Redis URL"}
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"Echo real-time messaging: deployment {opts.stack_name}",
        "Parameters": parameters,
        "Resources": {
            **_network(opts), **_security_groups(opts), **_cache(opts), **_storage(opts),
            **_roles(opts, image_repository_arn), **_service(opts, architecture), **_dns(opts),
        },
        "Outputs": outputs,
    }
