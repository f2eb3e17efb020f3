"""Writes the generated parts of the AWS templates: the MSK topics of ``msk.yaml`` from ``schemas/topics.py``.

``python -m infra.aws.generate`` rewrites the block between the markers in ``msk.yaml``; ``--check`` only says
whether it is current (exit 1 if not). The topics are declared once, in ``schemas.topics.ALL_TOPICS``: the
template's ``AWS::MSK::Topic`` resources are derived from it so the cluster can never drift from what
``make up`` creates locally (a unit test compares the committed block with this output).

``AWS::MSK::Topic`` (the MSK topic API: provisioned clusters, Kafka >= 3.6) takes ``Configs`` as the base64
of a JSON object of topic configs; ``Fn::Base64`` encodes the readable JSON written here. The dead-letter
topic's retention is a setting (``KafkaSettings.dead_letter_retention_days``), so it comes from the template
parameter ``DeadLetterRetentionMs`` like ``ensure_topics`` takes it from the settings locally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from schemas.topics import ALL_TOPICS, DEAD_LETTERS, TopicSpec

HERE = Path(__file__).resolve().parent
MSK_TEMPLATE = HERE / "msk.yaml"
BEGIN = "  # BEGIN GENERATED topics: python -m infra.aws.generate (from schemas/topics.py); do not edit"
END = "  # END GENERATED topics"
REPLICATION_FACTOR = 3
"""Every topic on three brokers in three AZs; with ``min.insync.replicas=2`` (cluster config) one may be lost."""
CLUSTER_REF = "Cluster"
PREFIX_PARAMETER = "TopicPrefix"
DEAD_LETTER_RETENTION_PARAMETER = "DeadLetterRetentionMs"


def logical_id(spec: TopicSpec) -> str:
    """``processed_transactions`` -> ``TopicProcessedTransactions`` (logical ids are alphanumeric)."""
    return "Topic" + "".join(part.capitalize() for part in spec.name.split("_"))


def _quoted(text: str) -> str:
    """A single-quoted YAML scalar: nothing in it is interpreted, a quote is doubled."""
    return "'" + text.replace("'", "''") + "'"


def topic_resource(spec: TopicSpec) -> list[str]:
    """The ``AWS::MSK::Topic`` resource of one topic, as template lines."""
    lines = [
        f"  {logical_id(spec)}:",
        "    Type: AWS::MSK::Topic",
        "    Properties:",
        f"      ClusterArn: !Ref {CLUSTER_REF}",
        f"      TopicName: !Sub {_quoted('${' + PREFIX_PARAMETER + '}' + spec.name)}",
        f"      PartitionCount: {spec.partitions}",
        f"      ReplicationFactor: {REPLICATION_FACTOR}",
    ]
    config = dict(spec.config)
    if spec.name == DEAD_LETTERS.name:
        config["retention.ms"] = "${" + DEAD_LETTER_RETENTION_PARAMETER + "}"
        lines += ["      Configs:", f"        Fn::Base64: !Sub {_quoted(json.dumps(config, sort_keys=True))}"]
    elif config:
        lines.append(f"      Configs: !Base64 {_quoted(json.dumps(config, sort_keys=True))}")
    return lines


def topics_block() -> str:
    """Every topic of ``ALL_TOPICS`` in declaration order, between the markers."""
    lines = [BEGIN]
    for spec in ALL_TOPICS:
        lines += topic_resource(spec) + [""]
    return "\n".join(lines[:-1] + [END]) + "\n"


def render(template: str) -> str:
    """``template`` with its generated block replaced by :func:`topics_block` (ValueError without markers)."""
    start, end = template.find(BEGIN), template.find(END)
    if start < 0 or end < start:
        raise ValueError(f"msk.yaml has no generated block ({BEGIN.strip()!r} ... {END.strip()!r})")
    return template[:start] + topics_block() + template[end + len(END) + 1 :]


def run(check: bool = False) -> int:
    """Rewrite (or with ``check`` only compare) the generated block of ``msk.yaml``; 1 when it was stale."""
    current = MSK_TEMPLATE.read_text()
    wanted = render(current)
    if current == wanted:
        typer.echo(f"{MSK_TEMPLATE.name}: topics are current")
        return 0
    if check:
        typer.echo(f"{MSK_TEMPLATE.name}: topics differ from schemas/topics.py; run python -m infra.aws.generate")
        return 1
    MSK_TEMPLATE.write_text(wanted)
    typer.echo(f"{MSK_TEMPLATE.name}: topics rewritten from schemas/topics.py")
    return 0


cli = typer.Typer(add_completion=False, help="Write the MSK topics of infra/aws/msk.yaml from schemas/topics.py.")


@cli.command()
def main(
    check: Annotated[
        bool, typer.Option("--check", help="Only check that msk.yaml is current (exit 1 if not).")
    ] = False,
) -> None:
    raise typer.Exit(run(check))


if __name__ == "__main__":
    cli()
