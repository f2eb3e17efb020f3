"""The AWS templates (infra/aws) against the code they deploy: nothing there is typed twice by hand.

The MSK topics must be ``schemas/topics.py``'s, every ``CG_*`` name a template sets must be a setting
(a typo would be silently ignored by pydantic-settings, leaving a default in production), and every ECS
health check must ask the port ``infra.metrics`` opens for that process. Templates are read with cfn-lint's
own decoder, which understands CloudFormation's short-form tags (``!Ref``, ``!Sub``...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, get_args

import pytest
from cfnlint.decode import decode
from pydantic import BaseModel, SecretStr

from infra import metrics
from infra.aws import generate
from infra.settings import KafkaSettings, MetricsSettings, Settings
from producers.camera_bridge import saved_records_path
from schemas.topics import ALL_TOPICS, DEAD_LETTERS
from sinks.alerts.sender import ledger_path

AWS_DIR = Path(generate.__file__).parent
TEMPLATES = sorted(AWS_DIR.glob("*.yaml"))
CG_NAME = re.compile(r"CG_[A-Z0-9_]+")


def load(path: Path) -> dict[str, Any]:
    template, problems = decode(str(path))
    assert not problems, f"{path.name}: {problems}"
    return template


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def setting_names() -> dict[str, Any]:
    """``CG_*`` name -> annotation of every setting, named the way ``Settings.to_env`` names them."""
    names: dict[str, Any] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            env = f"{prefix}__{name.upper()}" if prefix else name.upper()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(env, field.annotation)
            else:
                names[f"CG_{env}"] = field.annotation

    walk("", Settings)
    return names


def set_names(node: Any, found: dict[str, set[str]] | None = None, kind: str = "") -> dict[str, set[str]]:
    """``CG_*`` names a template sets -> how (``Environment``, ``Secrets``, ``PropertyMap``): the ``Name`` of
    ECS environment and secret entries and the keys of Flink property maps, wherever they sit (``Fn::If`` too)."""
    found = {} if found is None else found
    if isinstance(node, dict):
        if isinstance(node.get("Name"), str) and node["Name"].startswith("CG_"):
            found.setdefault(node["Name"], set()).add(kind)
        for key, value in node.items():
            if key.startswith("CG_"):
                found.setdefault(key, set()).add("PropertyMap")
            set_names(value, found, key if key in ("Environment", "Secrets", "PropertyMap") else kind)
    elif isinstance(node, list):
        for item in node:
            set_names(item, found, kind)
    return found


def substitute(value: Any, parameters: dict[str, str]) -> str:
    """A plain string, or an ``Fn::Sub`` of parameters only, resolved."""
    if isinstance(value, dict):
        (text,) = value.values()
        return re.sub(r"\$\{(\w+)\}", lambda m: parameters[m[1]], text)
    return str(value)


def test_setting_names_are_those_settings_export() -> None:
    """The walk below names settings exactly as ``Settings.to_env`` does (which omits unset ones)."""
    assert set(Settings().to_env()) <= set(setting_names())


def test_msk_topics_are_the_topic_declarations() -> None:
    template = load(AWS_DIR / "msk.yaml")
    retention_ms = int(KafkaSettings().dead_letter_retention_days * 86_400_000)
    assert int(template["Parameters"]["DeadLetterRetentionMs"]["Default"]) == retention_ms
    parameters = {"TopicPrefix": "cg-test.", "DeadLetterRetentionMs": "1234"}
    got = {}
    for props in (r["Properties"] for r in resources(template, "AWS::MSK::Topic").values()):
        assert props["ClusterArn"] == {"Ref": "Cluster"}
        configs = props.get("Configs", {"Fn::Base64": "{}"})["Fn::Base64"]
        got[substitute(props["TopicName"], parameters)] = (
            props["PartitionCount"],
            props["ReplicationFactor"],
            json.loads(substitute(configs, parameters)),
        )
    want = {
        spec.full_name("cg-test."): (
            spec.partitions,
            3,
            {**spec.config, **({"retention.ms": "1234"} if spec is DEAD_LETTERS else {})},
        )
        for spec in ALL_TOPICS
    }
    assert got == want


def test_msk_cluster_is_three_brokers_with_iam_tls_and_durable_defaults() -> None:
    template = load(AWS_DIR / "msk.yaml")
    (cluster,) = (r["Properties"] for r in resources(template, "AWS::MSK::Cluster").values())
    assert cluster["NumberOfBrokerNodes"] == 3
    assert cluster["ClientAuthentication"]["Sasl"]["Iam"]["Enabled"] is True
    assert cluster["ClientAuthentication"]["Unauthenticated"]["Enabled"] is False
    assert cluster["EncryptionInfo"]["EncryptionInTransit"] == {"ClientBroker": "TLS", "InCluster": True}
    (config,) = (r["Properties"] for r in resources(template, "AWS::MSK::Configuration").values())
    server = dict(line.split("=", 1) for line in config["ServerProperties"].splitlines() if line)
    assert server["min.insync.replicas"] == "2"
    assert server["default.replication.factor"] == "3"
    assert server["unclean.leader.election.enable"] == "false"
    assert server["auto.create.topics.enable"] == "false"


def test_committed_topics_are_the_generators_output() -> None:
    text = generate.MSK_TEMPLATE.read_text()
    assert generate.render(text) == text, "msk.yaml is stale: run python -m infra.aws.generate"
    assert generate.run(check=True) == 0


def test_generator_refuses_a_template_without_its_markers() -> None:
    with pytest.raises(ValueError, match="no generated block"):
        generate.render("Resources: {}\n")


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_cg_name_a_template_sets_or_mentions_is_a_setting(path: Path) -> None:
    valid = setting_names()
    named = set_names(load(path))
    unknown = sorted(set(named) - set(valid))
    assert not unknown, f"{path.name} sets variables that are no setting: {unknown}"
    mentioned = sorted(set(CG_NAME.findall(path.read_text())) - set(valid))
    assert not mentioned, f"{path.name} mentions variables that are no setting: {mentioned}"
    secret = {name for name, annotation in valid.items() if SecretStr in (annotation, *get_args(annotation))}
    in_clear = sorted(name for name, kinds in named.items() if name in secret and kinds != {"Secrets"})
    assert not in_clear, f"{path.name} puts secrets in plain environment or properties: {in_clear}"


def test_the_templates_set_settings_at_all() -> None:
    """Guards the test above against a walk that silently finds nothing."""
    assert "CG_KAFKA__BOOTSTRAP_SERVERS" in set_names(load(AWS_DIR / "flink.yaml"))
    services = set_names(load(AWS_DIR / "services.yaml"))
    assert services["CG_KAFKA__BOOTSTRAP_SERVERS"] == {"Environment"}
    assert services["CG_WEBEX__BOT_TOKEN"] == {"Secrets"}


def test_every_ecs_service_checks_the_health_port_infra_metrics_gives_it() -> None:
    template = load(AWS_DIR / "services.yaml")
    services = {
        r["Properties"]["ServiceName"]: r["Properties"] for r in resources(template, "AWS::ECS::Service").values()
    }
    assert set(services) == set(metrics.PROCESSES) - {"scoring-job"}  # the job runs on Managed Flink
    for name, service in services.items():
        task = template["Resources"][service["TaskDefinition"]["Ref"]]["Properties"]
        (container,) = task["ContainerDefinitions"]
        assert container["Name"] == name
        env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
        settings = Settings(metrics=MetricsSettings(base_port=int(env["CG_METRICS__BASE_PORT"])))
        port = metrics.port_of(settings, name)
        command = " ".join(container["HealthCheck"]["Command"])
        assert re.findall(r"//127\.0\.0\.1:(\d+)/healthz", command) == [str(port)], name
        assert port in {m["ContainerPort"] for m in container["PortMappings"]}, name
        assert container["Command"][:2] == ["python", "-m"] and find_spec(container["Command"][2]), name


def test_prometheus_in_the_vpc_may_reach_every_ecs_services_metrics_port() -> None:
    """The services' security group lets the VPC in on each service's ``/metrics`` port (it stopped one short of the
    case service's)."""
    template = load(AWS_DIR / "services.yaml")
    ingress = load(AWS_DIR / "network.yaml")["Resources"]["ServicesSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    open_ports = [(r["FromPort"], r["ToPort"]) for r in ingress if r["IpProtocol"] == "tcp"]
    for service in resources(template, "AWS::ECS::Service").values():
        task = template["Resources"][service["Properties"]["TaskDefinition"]["Ref"]]["Properties"]
        (container,) = task["ContainerDefinitions"]
        env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
        settings = Settings(metrics=MetricsSettings(base_port=int(env["CG_METRICS__BASE_PORT"])))
        port = metrics.port_of(settings, container["Name"])
        assert any(low <= port <= high for low, high in open_ports), (container["Name"], port, open_ports)


def test_the_job_sees_the_real_camera_and_a_face_deadline_long_enough_for_it() -> None:
    """The job's start check (``face_deadline_problem``) needs the stage's camera mode: without
    ``CG_CAMERAS__BASE_URL`` it passes any deadline, and the demo's 4 s would decide every checkout faceless."""
    from infra.settings import CameraSettings, JobSettings, face_deadline_problem

    flink = load(AWS_DIR / "flink.yaml")
    defaults = {name: str(p.get("Default", "")) for name, p in flink["Parameters"].items()}
    (app,) = (r["Properties"] for r in resources(flink, "AWS::KinesisAnalyticsV2::Application").values())
    groups = app["ApplicationConfiguration"]["EnvironmentProperties"]["PropertyGroups"]
    (props,) = (g["PropertyMap"] for g in groups if g["PropertyGroupId"] == "checkout-guard.settings")
    job = {k: defaults.get(v["Ref"]) if isinstance(v, dict) and "Ref" in v else v for k, v in props.items()}

    services = load(AWS_DIR / "services.yaml")
    (container,) = (
        c
        for r in resources(services, "AWS::ECS::TaskDefinition").values()
        for c in r["Properties"]["ContainerDefinitions"]
        if c["Name"] == "face-stage"
    )
    stage_env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
    assert stage_env["CG_CAMERAS__BASE_URL"] == {"Ref": "CamerasBaseUrl"}
    assert job["CG_CAMERAS__BASE_URL"] == services["Parameters"]["CamerasBaseUrl"]["Default"]
    assert "CG_CAMERAS__DEADLINE_S" not in stage_env and "CG_CAMERAS__DEADLINE_S" not in job  # both the default

    settings = Settings(
        cameras=CameraSettings(base_url=job["CG_CAMERAS__BASE_URL"]),
        job=JobSettings(face_deadline_ms=int(job["CG_JOB__FACE_DEADLINE_MS"])),
    )
    assert int(job["CG_JOB__FACE_DEADLINE_MS"]) >= 35_000 and face_deadline_problem(settings) is None
    # and the check does fire there: the demo's deadline with the same camera is refused
    assert face_deadline_problem(settings.model_copy(update={"job": JobSettings(face_deadline_ms=4000)}))


def test_managed_flink_can_run_either_layout_with_the_settings_bounds() -> None:
    """Without ``CG_JOB__LAYOUT`` the service ran the single layout, whatever its parallelism: scoring on one slot."""
    import typing

    from infra.settings import JobSettings

    flink = load(AWS_DIR / "flink.yaml")
    params = flink["Parameters"]
    (app,) = (r["Properties"] for r in resources(flink, "AWS::KinesisAnalyticsV2::Application").values())
    groups = app["ApplicationConfiguration"]["EnvironmentProperties"]["PropertyGroups"]
    (props,) = (g["PropertyMap"] for g in groups if g["PropertyGroupId"] == "checkout-guard.settings")
    assert props["CG_JOB__LAYOUT"] == {"Ref": "Layout"} and props["CG_JOB__STATE_SHARDS"] == {"Ref": "StateShards"}
    layouts = typing.get_args(JobSettings.model_fields["layout"].annotation)
    assert sorted(params["Layout"]["AllowedValues"]) == sorted(layouts)
    assert params["Layout"]["Default"] == JobSettings().layout  # an existing application keeps its state's layout
    (bound,) = (m.ge for m in JobSettings.model_fields["state_shards"].metadata if hasattr(m, "ge"))
    assert params["StateShards"]["MinValue"] == bound
    for layout in layouts:
        JobSettings(layout=layout, state_shards=int(params["StateShards"]["Default"]))


def test_managed_flink_scores_with_the_models_its_zip_ships_never_the_synthetic_default(tmp_path, monkeypatch) -> None:
    """``CG_MODEL__AUTO_TRAIN`` was left true and the zip had no models: the job trained the synthetic default on
    generated data at start and decided real traffic with it. The run options now ship ``pack``'s zip to each worker
    (extracted into a folder of its name in the worker's working directory), the models root the job reads there;
    without a champion the job stops rather than train one."""
    import zipfile

    from infra.settings import ModelSettings
    from jobs.model.registry import ModelRegistry, pack_models
    from tests.fraud_model import small_model

    flink = load(AWS_DIR / "flink.yaml")
    (app,) = (r["Properties"] for r in resources(flink, "AWS::KinesisAnalyticsV2::Application").values())
    groups = {
        g["PropertyGroupId"]: g["PropertyMap"]
        for g in app["ApplicationConfiguration"]["EnvironmentProperties"]["PropertyGroups"]
    }
    archive = groups["kinesis.analytics.flink.run.options"]["pyArchives"]
    props = groups["checkout-guard.settings"]
    assert "CG_MODEL__ARTIFACT" not in props and "CG_MODEL__BACKEND" not in props  # the champion CURRENT names
    model = ModelSettings(artifact_dir=props["CG_MODEL__ARTIFACT_DIR"], auto_train=props["CG_MODEL__AUTO_TRAIN"])
    assert model.auto_train is False
    assert archive.startswith("checkout-guard/") and model.artifact_dir == Path(Path(archive).name)

    root = tmp_path / "models"
    small_model().save(root)
    pack_models(root, tmp_path / "models-packed.zip")
    worker = tmp_path / "worker"
    with zipfile.ZipFile(tmp_path / "models-packed.zip") as zf:
        zf.extractall(worker / Path(archive).name)  # as Flink extracts a python archive without a target name
    monkeypatch.chdir(worker)
    registry = ModelRegistry(Settings(model=model))
    assert registry.champion is not None and registry.champion.version == small_model().version


def containers(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ECS container definition of ``template`` by name."""
    return {
        c["Name"]: c
        for r in resources(template, "AWS::ECS::TaskDefinition").values()
        for c in r["Properties"]["ContainerDefinitions"]
    }


def test_every_ecs_service_tags_people_with_one_shared_key() -> None:
    """The tasks share no stack directory: without ``CG_LOG__PERSON_TAG_KEY`` each generated a key of its own at
    every start, so the alert sender's and the dashboard's tags of one person never matched (README's rule: set
    it, the same for all, where the processes do not share a stack directory)."""
    template = load(AWS_DIR / "services.yaml")
    sources = {}
    for name, container in containers(template).items():
        secrets = {s["Name"]: s["ValueFrom"] for s in container.get("Secrets", []) if "Name" in s}
        assert "CG_LOG__PERSON_TAG_KEY" in secrets, f"{name} generates a person-tag key of its own"
        sources[name] = json.dumps(secrets["CG_LOG__PERSON_TAG_KEY"], sort_keys=True)
    (source,) = set(sources.values())
    key = template["Resources"][json.loads(source)["Ref"]]
    assert key["Type"] == "AWS::SecretsManager::Secret" and "GenerateSecretString" in key["Properties"]
    readable = template["Resources"]["ExecutionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    assert json.loads(source) in readable[0]["Resource"]


S3_ACTIONS = {
    "put_object": "s3:PutObject",
    "get_object": "s3:GetObject",
    "head_object": "s3:GetObject",
    "delete_object": "s3:DeleteObject",
    "put_object_tagging": "s3:PutObjectTagging",
    "get_object_tagging": "s3:GetObjectTagging",
    "list_objects_v2": "s3:ListBucket",
    "head_bucket": "s3:ListBucket",
}
"""The IAM action of each S3 call the image store makes (AWS's "Actions defined by Amazon S3")."""


def s3_calls(*methods: str) -> set[str]:
    """The boto3 S3 calls ``S3ImageStore`` makes, its paginators' too: in ``methods`` and the store's own methods they
    call, or (none named) in every method but ``ensure_buckets`` (embedded and test setups only: production
    provisions the buckets)."""
    import ast

    from infra.clients import image_store

    tree = ast.parse(Path(image_store.__file__).read_text())
    (store,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "S3ImageStore")
    bodies = {n.name: n for n in store.body if isinstance(n, ast.FunctionDef)}
    todo = list(methods or (name for name in bodies if name != "ensure_buckets"))
    seen: set[str] = set()
    calls = set()
    while todo:
        if (name := todo.pop()) in seen:
            continue
        seen.add(name)
        for node in ast.walk(bodies[name]):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "self" and node.func.attr in bodies:
                todo.append(node.func.attr)
            elif isinstance(owner, ast.Attribute) and owner.attr == "s3":
                if node.func.attr == "get_paginator":
                    calls.add(ast.literal_eval(node.args[0]))
                elif node.func.attr != "close":
                    calls.add(node.func.attr)
    return calls


def allowed_actions(role: dict[str, Any]) -> set[str]:
    return {
        action
        for policy in role["Properties"].get("Policies", [])
        for statement in policy["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow"
        for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
    }


def test_the_watchlist_service_may_make_every_s3_call_of_the_image_store() -> None:
    """It puts, reads, finds and deletes images, marks an alert's snapshot retained (an object tag) and purges the
    untagged ones: without ``s3:PutObjectTagging``/``s3:GetObjectTagging`` its task role got AccessDenied on every
    retain and every purge, so no alert snapshot was kept for its case and no expired snapshot was ever deleted."""
    calls = s3_calls()
    unknown = sorted(calls - set(S3_ACTIONS))
    assert not unknown, f"name the IAM action of these S3 calls in S3_ACTIONS: {unknown}"
    assert {"put_object_tagging", "get_object_tagging", "list_objects_v2"} <= calls  # the walk finds them
    template = load(AWS_DIR / "services.yaml")
    task = containers(template)["watchlist-service"]
    (definition,) = (
        r
        for r in resources(template, "AWS::ECS::TaskDefinition").values()
        if task in r["Properties"]["ContainerDefinitions"]
    )
    role = template["Resources"][definition["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]]
    missing = sorted({S3_ACTIONS[call] for call in calls} - allowed_actions(role))
    assert not missing, f"the watchlist service's task role lacks {missing}"


def services_whose_code_says(template: dict, pattern: re.Pattern[str]) -> set[str]:
    """The ECS services whose command's module (its package's files, for a package run) matches ``pattern``."""
    users = set()
    for name, container in containers(template).items():
        spec = find_spec(container["Command"][2])
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        sources = origin.parent.glob("*.py") if origin.name in ("__init__.py", "__main__.py") else [origin]
        if any(pattern.search(path.read_text()) for path in sources):
            users.add(name)
    return users


ALLOW_LIST = re.compile(r"\b(is_allowed|unlisted_owner|authenticate_command|allowed_room_ids)\b")


def test_every_ecs_service_that_checks_the_allow_list_gets_all_of_it() -> None:
    """The bot, the watchlist and case services and the dashboard's case page ask the one allow-list
    (``WebexSettings.is_allowed``, ``unlisted_owner``) alike: the dashboard had the people but not the rooms, so with
    rooms allowed it refused to assign a case to a room member whom the bot and the case service would take."""
    template = load(AWS_DIR / "services.yaml")
    users = services_whose_code_says(template, ALLOW_LIST)
    for name, container in containers(template).items():
        if name in users:
            env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
            assert env.get("CG_WEBEX__ALLOWED_ROOMS") == {"Ref": "WebexAllowedRooms"}, name
            assert env.get("CG_WEBEX__ALLOWED_PEOPLE") == {"Ref": "WebexAllowedPeople"}, name
    assert users == {"webex-bot", "watchlist-service", "case-service", "dashboard"}


BOTH = ("CheckoutImagesBucket", "SuspectImagesBucket")
S3_NEEDS: dict[str, set[tuple[str, str]]] = {
    "camera-bridge": set(),
    "opensearch-sink": set(),
    "case-service": set(),
    "face-stage": {("s3:PutObject", "CheckoutImagesBucket")},  # snapshots (jobs/faces/stage.py)
    "webex-bot": {("s3:PutObject", "CheckoutImagesBucket")},  # checkout <tx> keeps its snapshot (checkout_inspect)
    "dashboard": {(a, b) for a in ("s3:GetObject", "s3:ListBucket") for b in BOTH},  # shows them; 404, not 403
    # attaches the snapshot (get), asks whether the card has a reference photo (find: a missing one a 404, not a 403)
    "alert-sender": {(S3_ACTIONS[call], b) for call in s3_calls("get") for b in BOTH}
    | {(S3_ACTIONS[call], "SuspectImagesBucket") for call in s3_calls("find")},
    "watchlist-service": {(S3_ACTIONS[call], b) for call in s3_calls() for b in BOTH},
}
"""The S3 actions each service's code makes on the image buckets (snapshots, watchlist photos: biometric data)."""


def _bucket(resource: Any) -> str:
    """The bucket's logical id in ``!GetAtt B.Arn`` or ``!Sub ${B.Arn}/*``."""
    if "Fn::GetAtt" in resource:
        return resource["Fn::GetAtt"][0]
    match = re.fullmatch(r"\$\{(\w+)\.Arn\}/\*", resource["Fn::Sub"])
    assert match is not None, resource
    return match[1]


def test_each_ecs_service_may_touch_the_image_buckets_only_as_its_code_does() -> None:
    """Every service but the alert sender shared one role that could read, write and delete every snapshot and
    watchlist photo: the camera bridge (fed by the store networks' MQTT), the OpenSearch sink and the case service,
    which touch no image, and the dashboard, which only shows them, included. The alert sender's lacked
    ``s3:ListBucket``, so S3 answered its look-up of a card's missing reference photo 403, not 404: a warning
    instead of a card that quietly has no photo."""
    assert s3_calls("find") == {"head_object", "head_bucket"}  # the walk follows the store's own methods
    template = load(AWS_DIR / "services.yaml")
    tasks = resources(template, "AWS::ECS::TaskDefinition").values()
    for name, container in containers(template).items():
        (task,) = (t for t in tasks if container in t["Properties"]["ContainerDefinitions"])
        role = template["Resources"][task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]]
        granted = set()
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
                granted |= {(a, _bucket(r)) for a in actions if a.startswith("s3:") for r in targets}
        assert granted == S3_NEEDS[name], name


@pytest.mark.parametrize("parameter", ["WebexPublicUrl", "DashboardUrl"])
def test_a_public_url_the_services_refuse_over_plain_http_is_refused_at_deploy(parameter: str) -> None:
    """The bot refuses a plain-http public URL, the alert sender a plain-http case link with signed image links: a
    template that took them deployed services that stopped at every start."""
    pattern = re.compile(load(AWS_DIR / "services.yaml")["Parameters"][parameter]["AllowedPattern"])
    assert pattern.fullmatch("") and pattern.fullmatch("https://guard.chain.example")
    assert not pattern.fullmatch("http://guard.chain.example")


STORE_ZONES = {"CG_ALERTS__TIMEZONE": "AlertTimezone", "CG_ALERTS__STORE_TIMEZONES": "StoreTimezones"}


def environment(container: dict[str, Any]) -> dict[str, Any]:
    """A container's ``Environment`` by name -> value, an entry under ``Fn::If`` by its branch that sets it."""
    entries = []
    for entry in container.get("Environment", []):
        if "Fn::If" in entry:
            entries += [branch for branch in entry["Fn::If"][1:] if isinstance(branch, dict) and "Name" in branch]
        else:
            entries.append(entry)
    return {e["Name"]: e["Value"] for e in entries}


def test_every_ecs_service_that_shows_an_alerts_time_may_be_given_the_stores_zones() -> None:
    """Alert messages and the dashboard's alert page give an alert's time in its store's zone, which only the settings
    know: the template set none, so on Fargate, whose containers run in UTC, every alert read in UTC, hours off the
    stores' clocks, with no parameter to say otherwise."""
    template = load(AWS_DIR / "services.yaml")
    users = services_whose_code_says(template, re.compile(r"\b(zone_of|store_time)\b"))
    for name, container in containers(template).items():
        if name in users:
            env = environment(container)
            for setting, parameter in STORE_ZONES.items():
                assert env.get(setting) == {"Ref": parameter}, (name, setting)
    assert users == {"alert-sender", "dashboard"}
    assert all(template["Parameters"][p]["Default"] == "" for p in STORE_ZONES.values())  # unset: as before


STATE_FILES: dict[str, Callable[[Settings], Path]] = {
    "alert-sender": ledger_path,  # the delivery ledger: without it, delivered alerts are sent again
    "camera-bridge": saved_records_path,  # the records Kafka had not taken at the last stop
}
"""The files a service keeps across its restarts, by the functions that name them (on ECS, on the EFS file system:
before, on the task's own disk, lost whenever ECS replaced the task; the new alert sender sent delivered alerts
again, second mails and Webex messages, and lost the ids of the messages a forget must delete, and the new bridge lost
the records Kafka had not taken)."""
KEEPS_STATE = re.compile(r"\b(Ledger\.from_settings|saved_records_path)\b")
MOUNT_ACTIONS = {"elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"}
PARAMETERS = {"TopicPrefix": "cg-test.", "AWS::Region": "eu-west-1"}


def the_file_system(template: dict[str, Any]) -> str:
    ((fs_id, _),) = resources(template, "AWS::EFS::FileSystem").items()
    return fs_id


def task_of(template: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    (task,) = (
        r
        for r in resources(template, "AWS::ECS::TaskDefinition").values()
        if container in r["Properties"]["ContainerDefinitions"]
    )
    return task["Properties"]


def efs_grants(template: dict[str, Any], task: dict[str, Any]) -> list[dict[str, Any]]:
    """The statements of the task's role that allow an EFS action."""
    role = template["Resources"][task["TaskRoleArn"]["Fn::GetAtt"][0]]
    return [
        s
        for policy in role["Properties"].get("Policies", [])
        for s in policy["PolicyDocument"]["Statement"]
        if any(
            a.startswith("elasticfilesystem:") for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        )
    ]


def resolved_environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment with ``!Ref``/``!Sub`` of :data:`PARAMETERS` resolved; other entries left out."""
    out = {}
    for name, value in environment(container).items():
        if isinstance(value, str):
            out[name] = value
        elif value.get("Ref") in PARAMETERS:
            out[name] = PARAMETERS[value["Ref"]]
        elif isinstance(value.get("Fn::Sub"), str) and set(re.findall(r"\$\{([\w:]+)\}", value["Fn::Sub"])) <= set(
            PARAMETERS
        ):
            out[name] = re.sub(r"\$\{([\w:]+)\}", lambda m: PARAMETERS[m[1]], value["Fn::Sub"])
    return out


def test_the_state_file_system_is_encrypted_takes_tls_only_and_is_reached_in_each_private_subnet() -> None:
    template = load(AWS_DIR / "services.yaml")
    fs_id = the_file_system(template)
    fs = template["Resources"][fs_id]["Properties"]
    assert fs["Encrypted"] is True
    (deny,) = (s for s in fs["FileSystemPolicy"]["Statement"] if s["Effect"] == "Deny")
    assert (deny["Principal"], deny["Action"]) == ({"AWS": "*"}, "*")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

    targets = resources(template, "AWS::EFS::MountTarget").values()
    subnets = {"Fn::Split": [",", {"Fn::ImportValue": {"Fn::Sub": "${NetworkStack}-PrivateSubnets"}}]}
    assert sorted(t["Properties"]["SubnetId"]["Fn::Select"][0] for t in targets) == [0, 1, 2]
    for target in targets:
        assert target["Properties"]["FileSystemId"] == {"Ref": fs_id}
        assert target["Properties"]["SubnetId"]["Fn::Select"][1] == subnets
        assert target["Properties"]["SecurityGroups"] == [
            {"Fn::ImportValue": {"Fn::Sub": "${NetworkStack}-StateSecurityGroup"}}
        ]
    network = load(AWS_DIR / "network.yaml")
    ingress = network["Resources"]["StateSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"], r["SourceSecurityGroupId"]) for r in ingress] == [
        ("tcp", 2049, 2049, {"Ref": "ServicesSecurityGroup"})
    ]
    export = network["Outputs"]["StateSecurityGroup"]["Export"]["Name"]
    assert export == {"Fn::Sub": "${AWS::StackName}-StateSecurityGroup"}


def test_exactly_the_services_that_keep_files_mount_the_state_file_system_each_with_tls_and_iam_of_its_own() -> None:
    """Each through an access point of its own (its POSIX user, its folder), with a task role of its own that may mount
    and write (no root access) through that access point only; no other service mounts it or may."""
    template = load(AWS_DIR / "services.yaml")
    assert services_whose_code_says(template, KEEPS_STATE) == set(STATE_FILES)
    fs_id = the_file_system(template)
    owners = {}
    for name, container in containers(template).items():
        task = task_of(template, container)
        volumes = [v for v in task.get("Volumes", []) if "EFSVolumeConfiguration" in v]
        if name not in STATE_FILES:
            assert not volumes and not container.get("MountPoints") and not efs_grants(template, task), name
            continue
        (volume,) = volumes
        config = volume["EFSVolumeConfiguration"]
        assert (config["FilesystemId"], config["TransitEncryption"]) == ({"Ref": fs_id}, "ENABLED"), name
        assert config["AuthorizationConfig"]["IAM"] == "ENABLED", name
        point_id = config["AuthorizationConfig"]["AccessPointId"]["Ref"]
        point = template["Resources"][point_id]["Properties"]
        assert point["FileSystemId"] == {"Ref": fs_id}
        user, created = point["PosixUser"], point["RootDirectory"]["CreationInfo"]
        assert (created["OwnerUid"], created["OwnerGid"]) == (user["Uid"], user["Gid"]), name
        owners[name] = (point_id, user["Uid"], user["Gid"], point["RootDirectory"]["Path"])
        (grant,) = efs_grants(template, task)
        assert grant["Effect"] == "Allow" and set(grant["Action"]) == MOUNT_ACTIONS, name
        assert grant["Resource"] == {"Fn::GetAtt": [fs_id, "Arn"]}, name
        point_arn = {"Fn::GetAtt": [point_id, "Arn"]}
        assert grant["Condition"] == {"StringEquals": {"elasticfilesystem:AccessPointArn": point_arn}}, name
        roles = [t["Properties"]["TaskRoleArn"] for t in resources(template, "AWS::ECS::TaskDefinition").values()]
        assert roles.count(task["TaskRoleArn"]) == 1, f"{name} shares its task role"
        (mount,) = container["MountPoints"]
        assert mount["SourceVolume"] == volume["Name"] and not mount.get("ReadOnly"), name
    assert set(owners) == set(STATE_FILES)
    for part in range(4):  # access point, uid, gid, folder: each service's own
        assert len({owned[part] for owned in owners.values()}) == len(owners), owners


@pytest.mark.parametrize("name", sorted(STATE_FILES))
def test_a_service_that_keeps_files_keeps_them_on_its_mount_in_one_task_at_a_time(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its settings put the files on the mount (the ledger with SQLite's rollback journal: WAL is not safe over a
    network file system); one task, whose replacement starts once it has stopped (two never write one ledger), and
    only once the file system is reachable in every private subnet."""
    template = load(AWS_DIR / "services.yaml")
    container = containers(template)[name]
    (mount,) = container["MountPoints"]
    for key in [k for k in os.environ if k.startswith("CG_") and k != "CG_ENV_FILE"]:
        monkeypatch.delenv(key)
    for key, value in resolved_environment(container).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert STATE_FILES[name](settings).is_relative_to(mount["ContainerPath"])
    if name == "alert-sender":
        assert settings.alerts.ledger_journal_mode == "delete"
        assert ledger_path(settings).name == "cg-test.ledger.sqlite3"  # one per topic prefix, as by default

    (service,) = (
        r for r in resources(template, "AWS::ECS::Service").values() if r["Properties"]["ServiceName"] == name
    )
    assert service["Properties"]["DesiredCount"] == 1
    deployment = service["Properties"]["DeploymentConfiguration"]
    assert (deployment["MaximumPercent"], deployment["MinimumHealthyPercent"]) == (100, 0)
    assert set(service["DependsOn"]) == set(resources(template, "AWS::EFS::MountTarget"))


CREATES_INDICES = re.compile(r"\b(install_templates|save_sightings)\(")
"""How a service's code creates OpenSearch indices (the templates, the sink's own index)."""


def test_every_ecs_service_that_creates_indices_gives_them_replicas_on_the_zone_aware_domain() -> None:
    """The sink gave every index 0 replicas (the local single node's count) on a domain of three AZs: one data node
    lost lost the analysts' history and turned the indices red, stopping the writes. Now it is given
    ``OpenSearchReplicas``, at least 1 and at most one copy per zone beside the primary."""
    template = load(AWS_DIR / "services.yaml")
    users = services_whose_code_says(template, CREATES_INDICES)
    assert users == {"opensearch-sink"}
    for name in users:
        assert environment(containers(template)[name])["CG_OPENSEARCH__REPLICAS"] == {"Ref": "OpenSearchReplicas"}
    parameter = template["Parameters"]["OpenSearchReplicas"]
    domain = load(AWS_DIR / "opensearch.yaml")
    (cluster,) = (
        r["Properties"]["ClusterConfig"] for r in resources(domain, "AWS::OpenSearchService::Domain").values()
    )
    zones = cluster["ZoneAwarenessConfig"]["AvailabilityZoneCount"]
    assert cluster["ZoneAwarenessEnabled"] is True and zones == 3
    fewest_nodes = min(int(n) for n in domain["Parameters"]["DataNodes"]["AllowedValues"])
    allowed = {int(v) for v in parameter["AllowedValues"]}
    assert int(parameter["Default"]) == 1 and allowed == set(range(1, min(zones, fewest_nodes)))
