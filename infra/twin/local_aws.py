#!/usr/bin/env python3
"""The local AWS of the EC2 twin and of infra/test_infra.py: moto_server with the gaps
that stop our stack closed by small recording stand-ins, and an instance metadata
service (IMDSv2) per instance.

moto is patched in this process, so it runs in-process (ThreadedMotoServer):
- CloudFormation's AWS::ElasticLoadBalancingV2::LoadBalancer ignores `Type` (every
  balancer becomes an ALB, which refuses our TCP listener): the balancer is created
  with its type.
- SignalResource and CompleteLifecycleAction do not exist in moto: each is checked
  (the stack's resource / the group and its hook, registered or declared in a stack's
  LifecycleHookSpecificationList, which moto does not register) and recorded in `Aws.signals` /
  `Aws.lifecycle_actions` with the time it arrived.
- Fn::GetAtt of a target group (TargetGroupFullName, the dashboard's dimension) is
  answered from its ARN.
- DescribeTargetHealth answers from `Aws.target_health(instance_id)` when set (the
  twin's balancer), instead of moto's "healthy" for every running instance.

What real AWS does that this does not (see infra/twin/README.md): IAM policies are not
evaluated (any credentials pass), S3 does not verify x-amz-checksum-sha256 on upload,
CreationPolicy does not wait for signals (the twin checks them itself), Auto Scaling
does not launch, replace or terminate instances (the twin plays it), and volume
attachment is immediate (the twin hot-plugs the disk when it sees it).

Run alone, it is a local AWS to try `infra/deploy.sh` against without an account:

    python3 infra/twin/local_aws.py [--port 4566]
    AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=testing \\
      AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \\
      infra/deploy.sh --bucket B --stack S --dist dist/x86_64 --allow-dirty
"""

import argparse
import datetime
import http.server
import json
import secrets
import signal
import threading
import time

ACCOUNT = "123456789012"


class Aws:
    """moto on 127.0.0.1:`port` (0: a free one) with the stand-ins above."""

    def __init__(self, port=0):
        self.signals = []            # (time, stack, logical id, unique id, status)
        self.lifecycle_actions = []  # (time, group, hook, instance id, result)
        self.target_health = None    # instance id -> (state, reason) or None
        self.lock = threading.Lock()
        patch_moto(self)
        import logging
        import warnings
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
        # "No Moto CloudFormation support for AWS::Glue::Table" and the like: moto skips
        # those resources (README.md lists them).
        logging.getLogger("moto").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Tried to parse")
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.port = self.server._server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, base, region="us-east-1"):
        """`base` with credentials, region and endpoint for this local AWS."""
        return dict(base, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                    AWS_DEFAULT_REGION=region, AWS_ENDPOINT_URL=self.endpoint,
                    AWS_EC2_METADATA_DISABLED="true")

    def stop(self):
        self.server.stop()


def patch_moto(aws):
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.cloudformation.responses import CloudFormationResponse
    from moto.core.responses import EmptyResult
    from moto.elbv2 import models as elbv2

    def create_balancer(cls, resource_name, cloudformation_json, account_id, region_name,
                        **kwargs):
        p = cloudformation_json["Properties"]
        return elbv2.elbv2_backends[account_id][region_name].create_load_balancer(
            resource_name, p.get("SecurityGroups"), p.get("Subnets"),
            scheme=p.get("Scheme", "internet-facing"), loadbalancer_type=p.get("Type"))
    elbv2.FakeLoadBalancer.create_from_cloudformation_json = classmethod(create_balancer)

    def declared_hooks(account, region):
        """Hook names the stacks' groups declare (moto does not register a group's
        LifecycleHookSpecificationList)."""
        from moto.cloudformation.models import cloudformation_backends
        names = set()
        for stack in cloudformation_backends[account][region].stacks.values():
            for resource in getattr(stack.resource_map, "_resource_json_map", {}).values():
                if resource.get("Type") == "AWS::AutoScaling::AutoScalingGroup":
                    for spec in resource.get("Properties", {}).get("LifecycleHookSpecificationList", []):
                        names.add(spec.get("LifecycleHookName"))
        return names

    def complete_lifecycle_action(self):
        group = self._get_param("AutoScalingGroupName")
        hook = self._get_param("LifecycleHookName")
        hooks = self.autoscaling_backend.describe_lifecycle_hooks(
            as_name=group, lifecycle_hook_names=[hook])
        if not hooks and not (self.autoscaling_backend.describe_auto_scaling_groups([group])
                              and hook in declared_hooks(self.current_account, self.region)):
            raise ValueError(f"no lifecycle hook {hook} on {group}")
        with aws.lock:
            aws.lifecycle_actions.append((time.monotonic(), group, hook,
                                          self._get_param("InstanceId"),
                                          self._get_param("LifecycleActionResult")))
        return EmptyResult()
    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action

    def signal_resource(self):
        stack = self._get_param("StackName")
        logical = self._get_param("LogicalResourceId")
        # Checked against the stack's resource map (its template's logical ids): moto's
        # resource list has None for every type it does not model, and a stack made by
        # a change set keeps an empty template_dict.
        if logical not in self.cloudformation_backend.get_stack(stack).resource_map.keys():
            raise ValueError(f"no resource {logical} in stack {stack}")
        with aws.lock:
            aws.signals.append((time.monotonic(), stack, logical,
                                self._get_param("UniqueId"), self._get_param("Status")))
        return "<SignalResourceResponse><ResponseMetadata><RequestId>twin</RequestId>" \
               "</ResponseMetadata></SignalResourceResponse>"
    CloudFormationResponse.signal_resource = signal_resource

    # GetAtt of a target group (the dashboard's and alarms' dimensions): moto has none.
    def target_group_attribute(self, name):
        if name == "TargetGroupFullName":
            return self.arn.split(":")[-1]
        if name == "TargetGroupName":
            return self.name
        if name == "LoadBalancerArns":
            return list(self.load_balancer_arns)
        raise KeyError(name)
    elbv2.FakeTargetGroup.get_cfn_attribute = target_group_attribute

    original_health = elbv2.FakeTargetGroup.health_for

    def health_for(self, target, ec2_backend):
        answer = aws.target_health(target["Id"]) if aws.target_health else None
        if answer is None:
            return original_health(self, target, ec2_backend)
        state, reason = answer
        return elbv2.FakeHealthStatus(target["Id"], target.get("Port", self.port),
                                      self.health_check_port, state, reason)
    elbv2.FakeTargetGroup.health_for = health_for


class Instance:
    """What IMDS tells one instance; the twin changes `lifecycle_state`."""

    def __init__(self, instance_id, az, user_data, tags=None, role="sensorhub-instance"):
        self.instance_id = instance_id
        self.az = az
        self.user_data = user_data
        self.tags = tags or {}
        self.role = role
        self.lifecycle_state = "InService"


class Imds:
    """IMDSv2 for one instance on 127.0.0.1:`port`, as EC2 serves it: a token from
    PUT /latest/api/token (X-aws-ec2-metadata-token-ttl-seconds 1..21600, else 400),
    then GETs with X-aws-ec2-metadata-token (missing or expired: 401)."""

    def __init__(self, instance, port=0):
        self.instance = instance
        self.tokens = {}
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body=b"", content_type="text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                if self.path != "/latest/api/token":
                    return self.reply(404)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self.reply(400)
                token = secrets.token_urlsafe(32)
                imds.tokens[token] = time.monotonic() + int(ttl)
                self.send_response(200)
                self.send_header("X-aws-ec2-metadata-token-ttl-seconds", ttl)
                self.send_header("Content-Length", str(len(token)))
                self.end_headers()
                self.wfile.write(token.encode())

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                if imds.tokens.get(token, 0) < time.monotonic():
                    return self.reply(401)
                body = imds.answer(self.path)
                if body is None:
                    return self.reply(404)
                self.reply(200, body.encode() if isinstance(body, str) else body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path):
        i = self.instance
        if path == "/latest/user-data":
            return i.user_data
        prefix = "/latest/meta-data/"
        if not path.startswith(prefix):
            return None
        key = path[len(prefix):].rstrip("/")
        expires = (datetime.datetime.now(datetime.timezone.utc)
                   + datetime.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
        fixed = {
            "instance-id": i.instance_id,
            "placement/availability-zone": i.az,
            "placement/region": i.az[:-1],
            "autoscaling/target-lifecycle-state": i.lifecycle_state,
            "iam/security-credentials": i.role,
            f"iam/security-credentials/{i.role}": json.dumps({
                "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "testing",
                "SecretAccessKey": "testing", "Token": "twin", "Expiration": expires,
                "LastUpdated": expires}),
            "tags/instance": "\n".join(i.tags),
        }
        if key in fixed:
            return fixed[key]
        if key.startswith("tags/instance/"):
            return i.tags.get(key[len("tags/instance/"):])
        return None

    def stop(self):
        self.server.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4566)
    args = parser.parse_args()
    aws = Aws(args.port)
    print(f"local AWS at {aws.endpoint} (moto with the twin's stand-ins); Ctrl-C stops it",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    aws.stop()


if __name__ == "__main__":
    main()
