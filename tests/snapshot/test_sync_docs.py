"""docs/sync/eventbridge-sqs.yaml: parsed, checked against the code, deployed on moto's server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from healthimaging_df.engine import events

TEMPLATE = Path(__file__).parents[2] / "docs" / "sync" / "eventbridge-sqs.yaml"
DS = "a" * 32


def _template() -> dict[str, Any]:
    loaded = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_rule_queue_policy_and_iam_match_the_code() -> None:
    resources = _template()["Resources"]
    pattern = resources["ImageSetEventsRule"]["Properties"]["EventPattern"]
    assert pattern["source"] == [events.SOURCE]
    wanted = {kind for kind, action in events.ACTIONS.items() if action != "none"}
    assert set(pattern["detail-type"]) == wanted  # every event sync acts on, nothing it ignores
    assert pattern["detail"]["datastoreId"] == [{"Ref": "DatastoreId"}]
    target = resources["ImageSetEventsRule"]["Properties"]["Targets"][0]
    assert not {"Input", "InputPath", "InputTransformer"} & set(target)  # body = the event
    statement = resources["EventsQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert "aws:SourceArn" in statement["Condition"]["ArnEquals"]
    granted = {
        action
        for s in resources["SyncPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        for action in s["Action"]
    }
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"} <= granted
    assert {"medical-imaging:SearchImageSets", "medical-imaging:GetImageSet"} <= granted
    assert "medical-imaging:GetImageSetMetadata" not in granted  # an access: never by sync
    queue = resources["EventsQueue"]["Properties"]
    assert queue["RedrivePolicy"]["maxReceiveCount"] > 5  # after sync gives a message up


@pytest.fixture
def moto_endpoint(_ahi_moto_server: str) -> str:
    """The session's moto server (the plugin's private fixture)."""
    return _ahi_moto_server


# moto's CloudFormation creates every resource but the queue policies, and warns about those
@pytest.mark.filterwarnings("ignore:Tried to parse AWS..SQS..QueuePolicy:UserWarning")
def test_template_deploys_and_routes_only_the_datastores_events(moto_endpoint: str) -> None:
    pytest.importorskip("moto.server")
    import boto3

    settings = {
        "endpoint_url": moto_endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "local",
        "aws_secret_access_key": "local",
    }
    stacks = boto3.client("cloudformation", **settings)
    name = f"ahi-sync-{id(settings)}"
    stacks.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(encoding="utf-8"),
        Parameters=[{"ParameterKey": "DatastoreId", "ParameterValue": DS}],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = stacks.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    bus = boto3.client("events", **settings)
    sqs = boto3.client("sqs", **settings)
    url = sqs.get_queue_url(QueueName=outputs["QueueUrl"].rsplit("/", 1)[1])["QueueUrl"]
    for datastore, kind in ((DS, "Image Set Created"), ("f" * 32, "Image Set Created"),
                            (DS, "Image Set Updating")):  # fmt: skip
        bus.put_events(
            Entries=[
                {
                    "Source": events.SOURCE,
                    "DetailType": kind,
                    "Detail": json.dumps({"datastoreId": datastore, "imageSetId": "b" * 32}),
                }
            ]
        )
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    bodies = [json.loads(m["Body"]) for m in got.get("Messages", [])]
    assert [(b["detail-type"], b["detail"]["datastoreId"]) for b in bodies] == [
        ("Image Set Created", DS)
    ]
    parsed = events.parse(json.dumps(bodies[0]), DS)
    assert isinstance(parsed, events.Event)
    assert parsed.action == "upsert"
    stacks.delete_stack(StackName=name)
