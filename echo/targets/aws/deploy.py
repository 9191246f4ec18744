"""Apply a template with boto3: create or update one stack, stream its events, bound the wait.

A failed change raises :class:`TargetError` naming the first resource that failed and
CloudFormation's reason (not the "Resource creation cancelled" noise that follows it).
An update with nothing to change is recognised ("No updates are to be performed") and is
a no-op. Every wait ends: at the stack's final state or at ``timeout``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from echo.targets.base import Progress, TargetError

NO_UPDATES = "No updates are to be performed"
FAILED_NOISE = ("Resource creation cancelled", "Resource update cancelled",
                "Resource deletion cancelled")


def _message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", exc))


class StackDeployer:
    def __init__(self, client: Any, stack_name: str, progress: Progress,
                 timeout: float = 45 * 60, poll: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.name = stack_name
        self.progress = progress
        self.timeout = timeout
        self.poll = poll
        self.clock = clock

    # -- reading -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any] | None:
        """The stack, or None when there is none (deleted stacks count as none)."""
        try:
            stacks = self.client.describe_stacks(StackName=self.name)["Stacks"]
        except ClientError as exc:
            if "does not exist" in _message(exc):
                return None
            raise
        if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
            return None
        return stacks[0]

    def outputs(self) -> dict[str, str]:
        stack = self.describe()
        if stack is None:
            return {}
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    # -- changing ------------------------------------------------------------------------

    def apply(self, template: dict[str, Any], parameters: dict[str, str],
              tags: dict[str, str]) -> str:
        """Create or update the stack; return ``created``, ``updated`` or ``unchanged``."""
        body = json.dumps(template, indent=1, sort_keys=True)
        request = {
            "StackName": self.name, "TemplateBody": body,
            "Parameters": [{"ParameterKey": k, "ParameterValue": v}
                           for k, v in sorted(parameters.items())],
            "Capabilities": ["CAPABILITY_IAM"],
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())],
        }
        existing = self.describe()
        if existing is not None:
            status = existing["StackStatus"]
            if status == "ROLLBACK_COMPLETE":
                # a first create that failed leaves a stack that can only be deleted
                self.progress(f"stack {self.name} is ROLLBACK_COMPLETE from a failed create: "
                              "deleting it before creating it again")
                self.delete()
                existing = None
            elif status.endswith("_IN_PROGRESS"):
                raise TargetError(
                    f"stack {self.name} is busy ({status}); wait for it to finish "
                    "(`echoctl status --target aws`) and deploy again")
            elif status in ("UPDATE_ROLLBACK_FAILED", "DELETE_FAILED"):
                raise TargetError(
                    f"stack {self.name} is {status}: fix it in the CloudFormation console "
                    "(continue the rollback, or delete it), then deploy again")
        if existing is None:
            self.progress(f"creating stack {self.name}")
            try:
                stack_id = self.client.create_stack(**request)["StackId"]
            except ClientError as exc:
                raise TargetError(f"CloudFormation refused the stack: {_message(exc)}") from None
            self._wait(set(), "CREATE_COMPLETE", stack_id)
            return "created"
        seen = self._seen_before(existing["StackId"])
        try:
            self.client.update_stack(**request)
        except ClientError as exc:
            if NO_UPDATES in _message(exc):
                self.progress(f"stack {self.name}: no changes")
                return "unchanged"
            raise TargetError(f"CloudFormation refused the update: {_message(exc)}") from None
        self.progress(f"updating stack {self.name}")
        self._wait(seen, "UPDATE_COMPLETE", existing["StackId"])
        return "updated"

    def delete(self) -> bool:
        """Delete the stack and wait; False when there was none."""
        stack = self.describe()
        if stack is None:
            return False
        seen = self._seen_before(stack["StackId"])
        self.progress(f"deleting stack {self.name}")
        self.client.delete_stack(StackName=stack["StackId"])
        self._wait(seen, "DELETE_COMPLETE", stack["StackId"])
        return True

    # -- waiting -------------------------------------------------------------------------

    def _events(self, stack_id: str, seen: set[str]) -> list[dict[str, Any]]:
        """Events not seen yet, oldest first (the API lists newest first)."""
        fresh: list[dict[str, Any]] = []
        paginator = self.client.get_paginator("describe_stack_events")
        for page in paginator.paginate(StackName=stack_id):
            for event in page["StackEvents"]:
                if event["EventId"] in seen:
                    return list(reversed(fresh))
                seen.add(event["EventId"])
                fresh.append(event)
        return list(reversed(fresh))

    def _seen_before(self, stack_id: str) -> set[str]:
        """Events from earlier changes (the newest page is enough: we stop at a seen one)."""
        page = self.client.describe_stack_events(StackName=stack_id)
        return {event["EventId"] for event in page["StackEvents"]}

    def _wait(self, seen: set[str], goal: str, stack_id: str) -> None:
        failures: list[dict[str, Any]] = []
        deadline = self.clock() + self.timeout
        while True:
            for event in self._events(stack_id, seen):
                reason = event.get("ResourceStatusReason") or ""
                line = (f"{event['LogicalResourceId']} ({event['ResourceType']}) "
                        f"{event['ResourceStatus']}")
                self.progress(line + (f": {reason}" if reason else ""))
                if event["ResourceStatus"].endswith("_FAILED") and event["LogicalResourceId"] \
                        != self.name:
                    failures.append(event)
            stacks = self.client.describe_stacks(StackName=stack_id)["Stacks"]
            status = stacks[0]["StackStatus"] if stacks else "DELETE_COMPLETE"
            if not status.endswith("_IN_PROGRESS"):
                break
            if self.clock() > deadline:
                raise TargetError(
                    f"stack {self.name} still {status} after {self.timeout / 60:.0f} min; "
                    "CloudFormation keeps going: watch `echoctl status --target aws` and deploy "
                    "again when it is done (or raise -o timeout=MINUTES)")
            time.sleep(self.poll)
        if status != goal:
            raise TargetError(self._failure(status, failures, stacks[0] if stacks else {}))

    def _failure(self, status: str, failures: list[dict[str, Any]], stack: dict[str, Any]) -> str:
        causes = [e for e in failures if not (e.get("ResourceStatusReason") or "").startswith(
            FAILED_NOISE)] or failures
        if causes:
            first = causes[0]
            where = f"{first['LogicalResourceId']} ({first['ResourceType']})"
            reason = first.get("ResourceStatusReason") or "no reason given"
            return (f"stack {self.name} ended {status}: {where} failed: {reason}. "
                    "Fix the cause and run `echoctl deploy --target aws` again")
        reason = stack.get("StackStatusReason") or "no reason given"
        return (f"stack {self.name} ended {status}: {reason}. See its events in the "
                "CloudFormation console, then deploy again")
