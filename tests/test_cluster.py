"""The cluster path: cluster.yaml and its image, trials that claim what the autoscaler can
provide, and a trial that survives the loss of its node."""

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import click
import moto.server
import psutil
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
import ray.scripts.scripts
import werkzeug.serving
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster
from test_train import steps_by_tag
from test_tune import TINY, _checkpoint_steps, _newest_steps, _reported_steps

from raydeq.experiments import run, spec
from raydeq.training import capacity, launch, reporting, storage
from raydeq.training.config import validate

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-"
# What `ray up` fills in for cluster.yaml's instance types (AWS's instance type table).
# The cluster's shared runs and data folders, as the experiments that store there name them.
IMAGENET = yaml.safe_load((ROOT / "tune_configs" / "imagenet.yaml").read_text())
SHARED_RUNS, IMAGENET_DATA = IMAGENET["storage_path"], IMAGENET["data"]["data_dir"]
FILLED = {"head": {"CPU": 8}, "gpu_worker": {"CPU": 48, "GPU": 4}}
EMPTY_LISTS = (
    *("initialization_commands", "setup_commands", "head_setup_commands"),
    *("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"),
    *("cluster_synced_files", "rsync_exclude", "rsync_filter"),
)


def test_cluster_yaml_passes_the_autoscaler_schema_with_least_privilege():
    validate_config(prepare_config(CLUSTER))
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    types = CLUSTER["available_node_types"]
    for name, node_type in types.items():
        image = node_type["node_config"]["ImageId"]
        assert image.startswith(DLAMI) or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), name
        assert "IamInstanceProfile" not in node_type["node_config"], name
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] >= 1
    assert CLUSTER["file_mounts"] == {"/home/ray/raydeq": "."}
    assert "pip install -q --no-deps -e /home/ray/raydeq" in CLUSTER["setup_commands"]
    start = CLUSTER["head_start_ray_commands"]
    assert start[-1] == "python -m raydeq.training.capacity ~/ray_bootstrap_config.yaml"


def test_the_image_holds_the_pinned_versions_and_the_cluster_names_it():
    requirements = PYPROJECT["project"]["dependencies"]
    assert {"torch==2.14.1", "torchvision==0.29.1", "ray[default,train,tune]==2.60.0"} <= set(
        requirements
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu\n" in dockerfile
    assert "--extra-index-url https://download.pytorch.org/whl/cu130" in dockerfile
    assert CLUSTER["docker"]["image"].endswith(f"/raydeq:{PYPROJECT['project']['version']}")


def test_the_worker_s3_policy_writes_only_the_runs_prefix_of_one_bucket():
    policy = json.loads((ROOT / "cluster" / "worker-s3-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    }
    resources = {s["Resource"] for s in policy["Statement"]}
    assert resources == {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/raydeq-runs/*"}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])


def test_the_readme_gives_a_shared_storage_to_the_experiments_that_store_in_runs_on_a_cluster():
    """The README said the embedded-digits experiments run anywhere, but they store in `runs`
    of the folder they run in, on a cluster the head node's own disk, and a trial on a GPU
    node stopped at its first checkpoint; it names each such file and the shared folder."""
    local = sorted(
        path.stem
        for path in (ROOT / "tune_configs").glob("*.yaml")
        if "storage_path" not in yaml.safe_load(path.read_text())
    )
    assert local == ["digits", "digits_search", "mnist_dense", "mnist_mdeq", "mnist_search"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    start = readme.index("`mnist_dense` trains on the embedded")
    sentence = readme[start:].split(". The other", 1)[0]
    assert all(f"`{name}`" in sentence for name in local)
    assert "head node's own disk" in sentence and f"`--storage {SHARED_RUNS}`" in sentence


def test_the_readmes_costs_count_the_reads_of_imagenet_from_efs():
    """The cost estimate left out EFS's charge for reads in Elastic mode ($0.03 per GB), which
    one ImageNet trial runs up reading its images from the shared file system (ImageNet's 1,281,167
    training images are 147.9 GB, 115 kB each); it gives it for the experiment's steps and
    batch, and what Bursting mode's baseline (50 kB/s per GB, reads metered at a third) reads."""
    imagenet = spec.load("imagenet").trial_config({})
    assert Path(imagenet.data.data_dir).is_relative_to(Path(SHARED_RUNS).parent)
    image = 147.9e9 / 1_281_167
    read = imagenet.train.max_steps * imagenet.data.batch_size * image
    baseline = 3 * 50e3 * 150  # bytes a second of reads for 150 GB stored
    readme = " ".join((ROOT / "README.md").read_text().split())
    costs = readme.split("**What it costs**", 1)[1].split("**GCP or on-premises.**", 1)[0]
    assert (
        f"about ${round(read / 1e9 * 0.03, -1):.0f} for the {read / 1e12:.1f} TB that one "
        f"ImageNet trial of {imagenet.train.max_steps:,} steps reads "
        f"({imagenet.data.batch_size} images of {image / 1e3:.0f} kB on average a step)" in costs
    )
    assert (
        f"about {baseline / 1e6:.0f} MB/s of them, some {round(baseline / image, -2):.0f}" in costs
    )


def test_the_readme_asks_for_the_gpu_instance_quota_that_the_gpu_nodes_need():
    """EC2 refuses a launch past the account's vCPU quota for G instances, which many
    accounts hold below one g5.12xlarge, and the trials waited for GPUs without a word: the
    README asks for the vCPUs of every GPU node the cluster may start."""
    gpu = CLUSTER["available_node_types"]["gpu_worker"]
    nodes = min(gpu["max_workers"], CLUSTER["max_workers"])
    assert gpu["node_config"]["InstanceType"].startswith("g")
    cpus = FILLED["gpu_worker"]["CPU"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (
        f'"Running On-Demand G and VT instances" (Service Quotas) at {nodes * cpus} vCPUs '
        f"({nodes} nodes x {cpus})" in readme
    )


def test_the_readme_asks_for_an_efs_mount_target_in_each_zone_the_nodes_start_in():
    """The file system's name (fs-ID.efs.REGION.amazonaws.com) resolves only in a zone where
    it has a mount target, and a node started in another failed at the mount: the README's
    storage step names every zone of provider.availability_zone, in which `ray up` picks the
    nodes' subnets, and the mount names the provider's region."""
    provider = CLUSTER["provider"]
    zones = [zone.strip() for zone in provider["availability_zone"].split(",")]
    readme = " ".join((ROOT / "README.md").read_text().split())
    step = readme.split("**Shared storage.**", 1)[1].split("**Start the cluster**", 1)[0]
    assert (
        f"mount target in each zone of `provider.availability_zone` ({' and '.join(zones)}:" in step
    )
    (mount,) = [command for command in CLUSTER["initialization_commands"] if "nfs4 -o" in command]
    assert re.search(r"\.efs\.([a-z0-9-]+)\.amazonaws\.com:/ ", mount)[1] == provider["region"]


def test_the_readmes_data_copy_runs_on_the_head_nodes_host_where_an_aws_cli_is(monkeypatch):
    """The image has no AWS CLI (Ray's image installs boto3 alone, the Dockerfile nothing
    more), and `ray attach`, which the README named for `aws s3 sync`, opens a shell in it;
    the README's command, as Ray's CLI reads it, runs the copy on the host."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    (command,) = re.findall(r"`(ray exec [^`]*aws s3 sync [^`]*)`", readme)
    ran = {}
    monkeypatch.setattr(ray.scripts.scripts, "exec_cluster", lambda *a, **kw: ran.update(kw))
    ray.scripts.scripts.exec.main(shlex.split(command)[2:], standalone_mode=False)
    assert ran["run_env"] == "host"
    assert ran["cmd"] == f"aws s3 sync s3://YOUR-BUCKET/imagenet {IMAGENET_DATA}"
    assert "awscli" not in (ROOT / "Dockerfile").read_text()


def _iam_request(method: str, path: str, query: str) -> tuple[str, str, dict[str, str]]:
    """The IAM action, resource and condition keys of an S3 request (AWS's S3 API reference:
    HeadBucket and ListObjectsV2 are s3:ListBucket, the latter with its prefix as s3:prefix)."""
    bucket, _, key = path.lstrip("/").partition("/")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if not key:
        assert method in ("GET", "HEAD"), (method, query)  # ListObjectsV2, HeadBucket
        context = {"s3:prefix": params["prefix"][0]} if "prefix" in params else {}
        return "s3:ListBucket", f"arn:aws:s3:::{bucket}", context
    if method == "DELETE":
        action = "s3:AbortMultipartUpload" if "uploadId" in params else "s3:DeleteObject"
    else:  # POST and PUT write an object, whole or in the parts of a multipart upload
        action = "s3:GetObject" if method in ("GET", "HEAD") else "s3:PutObject"
    return action, f"arn:aws:s3:::{bucket}/{key}", {}


def _allows(policy: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether an Allow statement of `policy` grants `action` on `resource`; a StringLike
    condition holds only where the request has its key (IAM's rule for a missing key)."""

    def like(pattern: str, value: str) -> bool:
        return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), value) is not None

    for statement in policy["Statement"]:
        conditions = statement.get("Condition", {})
        assert set(conditions) <= {"StringLike"}, conditions
        holds = all(
            key in context and any(like(p, context[key]) for p in patterns)
            for key, patterns in conditions.get("StringLike", {}).items()
        )
        if action in statement["Action"] and like(statement["Resource"], resource) and holds:
            return True
    return False


def test_the_worker_s3_policy_allows_every_request_a_workers_write_to_the_runs_makes(monkeypatch):
    """A worker writing under s3://BUCKET/raydeq-runs (its TensorBoard events, a checkpoint)
    creates the folder first, and pyarrow's create_dir asks HeadBucket whether the bucket
    exists: s3:ListBucket with no s3:prefix, which a ListBucket held to the runs prefix
    refused, failing every write; each request it sends, recorded at a local S3 server, is
    allowed."""
    policy = json.loads((ROOT / "cluster" / "worker-s3-policy.json").read_text())
    policy = json.loads(json.dumps(policy).replace("YOUR-BUCKET", "raydeq-bucket"))
    app = moto.server.DomainDispatcherApplication(moto.server.create_backend_app)
    sent = []

    def recorded(environ: dict, start_response: Any) -> Any:
        sent.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"]))
        return app(environ, start_response)

    server = werkzeug.serving.make_server("127.0.0.1", 0, recorded, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        owner = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        owner.create_dir("raydeq-bucket")
        sent.clear()
        storage.write_bytes("s3://raydeq-bucket/raydeq-runs/exp/trial/train/events", b"step")
        checkpoint = "raydeq-bucket/raydeq-runs/exp/trial/train/checkpoint_000001"
        fs, _ = storage.filesystem("s3://raydeq-bucket")
        fs.create_dir(checkpoint)  # as Ray Train's persist_current_checkpoint does
        with fs.open_output_stream(f"{checkpoint}/state.pt") as stream:
            stream.write(b"weights")
    finally:
        server.shutdown()
        server.server_close()
    requests = [_iam_request(*r) for r in sent if r[1].startswith("/raydeq-bucket")]
    assert ("s3:ListBucket", "arn:aws:s3:::raydeq-bucket", {}) in requests
    refused = [r for r in requests if not _allows(policy, *r)]
    assert refused == []


def test_imagenet_claims_gpus_and_runs_as_many_trials_as_the_autoscaler_can_provide(monkeypatch):
    autoscaling = prepare_config(CLUSTER)
    for name, resources in FILLED.items():
        autoscaling["available_node_types"][name]["resources"] = resources
    groups = capacity.cluster_config(autoscaling).node_group_configs
    types = [capacity.NodeType(dict(g.resources), g.max_count) for g in groups]
    assert sorted((t.max_count, dict(t.resources)) for t in types) == [
        (1, {"CPU": 8}),
        (4, {"CPU": 48, "GPU": 4}),
    ]
    monkeypatch.setattr(capacity, "node_types", lambda: types)
    imagenet = spec.load("imagenet")
    cfg = imagenet.trial_config({})
    assert cfg.scaling.device == "auto" and cfg.scaling.num_workers == 4
    assert launch.gpus_per_worker(cfg) == 1.0
    # 4 nodes x 4 GPUs, 4 GPU workers per trial (48 CPUs hold 4 workers of 10 CPUs too)
    assert run.concurrency(imagenet, None) == 4
    assert run.concurrency(imagenet, None, limit=2) == 2
    cpu_only = [t for t in types if "GPU" not in t.resources]
    monkeypatch.setattr(capacity, "node_types", lambda: cpu_only)
    assert launch.gpus_per_worker(cfg) == 0.0


def _published(autoscaling: dict) -> list[capacity.NodeType]:
    """The node types that `python -m raydeq.training.capacity` publishes for `autoscaling`."""
    groups = capacity.cluster_config(autoscaling).node_group_configs
    return [capacity.NodeType(dict(g.resources), g.max_count) for g in groups]


def test_a_node_type_that_no_max_workers_limits_is_published_without_a_limit(monkeypatch):
    """An autoscaling config without max_workers, at the top or for a worker type, failed to
    publish ('not an autoscaling config (Value out of range: 9223372036854775807)', a count
    past Ray's int32 field); such a type is published as Ray's -1, no limit, and holds any
    number of workers, while the head type counts its one node."""
    autoscaling = {
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8}},
            "gpu": {"resources": {"CPU": 48, "GPU": 4}},
        },
    }
    types = _published(autoscaling)
    assert [t.max_count for t in types] == [1, -1]
    monkeypatch.setattr(capacity, "node_types", lambda: types)
    assert capacity.worker_slots({"CPU": 10, "GPU": 1}) == capacity.UNBOUNDED
    assert capacity.worker_slots({"CPU": 8}) == capacity.UNBOUNDED
    assert _published(autoscaling | {"max_workers": 3})[1].max_count == 3


def test_on_gcp_trials_claim_gpus_only_with_the_node_resources_the_readme_gives(monkeypatch):
    """Ray fills node types' resources in from the instance type on AWS only: on GCP
    cluster.yaml's empty ones publish no GPU; those the README gives hold 4 ImageNet trials."""
    gcp = {"type": "gcp", "region": "us-central1", "project_id": "p"}
    autoscaling = prepare_config(CLUSTER | {"provider": gcp})
    monkeypatch.setattr(capacity, "node_types", lambda: _published(autoscaling))
    assert not capacity.can_have("GPU")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`{CPU: 8}` for the head, `{CPU: 48, GPU: 4}` for `a2-highgpu-4g`" in readme
    for name, resources in {"head": {"CPU": 8}, "gpu_worker": {"CPU": 48, "GPU": 4}}.items():
        autoscaling["available_node_types"][name]["resources"] = resources
    assert capacity.can_have("GPU") and run.concurrency(spec.load("imagenet"), None) == 4


def test_on_kuberay_the_readme_publishes_the_node_groups_that_no_autoscaler_reports(
    monkeypatch,
):
    """The README said KubeRay's autoscaler reports the node groups to Ray, but Ray 2.60's
    autoscalers write no cluster config (nothing in Ray calls report_cluster_config), so
    trials counted the pods alive and claimed no GPUs; the groups it publishes instead hold
    4 ImageNet trials of GPU workers."""
    autoscaler = Path(ray.autoscaler.__file__).parent
    sources = [path.read_text() for path in autoscaler.rglob("*.py")]
    assert not any("report_cluster_config" in source for source in sources)
    readme = " ".join((ROOT / "README.md").read_text().split())
    kuberay = readme.split("On Kubernetes, KubeRay", 1)[1].split("On machines of your own", 1)[0]
    assert "reports the node groups" not in kuberay
    (groups,) = re.findall(r"`(\{head_node_type: .*?\}\}\})`", kuberay)
    assert "`python -m raydeq.training.capacity FILE`" in kuberay
    monkeypatch.setattr(capacity, "node_types", lambda: _published(yaml.safe_load(groups)))
    imagenet = spec.load("imagenet")
    assert launch.gpus_per_worker(imagenet.trial_config({})) == 1.0
    assert run.concurrency(imagenet, None) == 4


def test_on_machines_of_ones_own_the_file_drops_the_node_types_and_the_capacity_step():
    """`ray up` refuses node types for an on-premise cluster and makes one without resources,
    which the capacity step would publish as a cluster with no GPUs."""
    local = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(CLUSTER | {"provider": local})
    kept = {k: v for k, v in CLUSTER.items() if k not in ("available_node_types", "head_node_type")}
    start = CLUSTER["head_start_ray_commands"][:-1]
    autoscaling = prepare_config(kept | {"provider": local, "head_start_ray_commands": start})
    validate_config(autoscaling)
    assert [t.resources for t in _published(autoscaling)] == [{}]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "with the rest of the file but `available_node_types` and `head_node_type`" in readme
    assert "and the `raydeq.training.capacity` step (it would publish that type" in readme


def test_a_trials_workers_share_its_cpus_and_take_the_gpus_given_else_one_where_nodes_have_gpus(
    monkeypatch,
):
    """Two workers of 2 CPUs give up the trial process's 0.01 CPU between them; GPUs per worker
    are as given, 0 too, else one on a cluster whose node types have GPUs (none for device
    cpu)."""
    gpu_nodes = [capacity.NodeType({"CPU": 8, "GPU": 4}, 2)]
    monkeypatch.setattr(capacity, "node_types", lambda: gpu_nodes)
    scaling = {"num_workers": 2, "cpus_per_worker": 2}
    two = spec.from_dict("x", {**TINY, "scaling": scaling})
    assert run.trial_workers(two, 0) == (2, {"CPU": 1.995})
    assert run.trial_workers(two, None) == (2, {"CPU": 1.995, "GPU": 1.0})
    for gpus, got in [(0, 0), (0.5, 0.5), (None, 1.0)]:
        assert run.trial_gpus(two, run.Options(gpus, 1, "fifo", 0)) == got
    cpu = spec.from_dict("x", {**TINY, "scaling": scaling | {"device": "cpu"}})
    assert run.trial_gpus(cpu, run.Options(None, 1, "fifo", 0)) == 0


def test_trials_too_large_for_every_node_type_run_one_at_a_time_with_a_note(monkeypatch, capsys):
    """Two workers of 1.995 CPUs: none fits a 1-CPU node, so one trial is let in (it waits
    for a node) and a note says why; three 4-CPU nodes hold two each: three trials, no note."""
    scaling = {"num_workers": 2, "cpus_per_worker": 2, "device": "cpu"}
    experiment = spec.from_dict("x", {**TINY, "scaling": scaling})
    monkeypatch.setattr(capacity, "node_types", lambda: [capacity.NodeType({"CPU": 1}, 3)])
    assert run.concurrency(experiment, None) == 1
    assert capsys.readouterr().out == (
        "note: one trial needs 2 workers x {'CPU': 1.995}, more than any node type of the "
        "cluster provides; trials wait for nodes that can hold them\n"
    )
    monkeypatch.setattr(capacity, "node_types", lambda: [capacity.NodeType({"CPU": 4}, 3)])
    assert run.concurrency(experiment, None) == 3
    assert run.concurrency(experiment, None, limit=2) == 2
    assert run.concurrency(experiment, None, limit=5) == 3
    monkeypatch.setattr(capacity, "node_types", lambda: [capacity.NodeType({"CPU": 4}, 1)])
    assert run.concurrency(experiment, None) == 1
    assert capsys.readouterr().out == ""
    # On two nodes of 8 CPUs and a GPU: 1 trial of two GPU workers, 4 of CPU workers.
    auto = spec.from_dict("x", {**TINY, "scaling": scaling | {"device": "auto"}})
    gpu_nodes = [capacity.NodeType({"CPU": 8, "GPU": 1}, 2)]
    monkeypatch.setattr(capacity, "node_types", lambda: gpu_nodes)
    assert run.concurrency(auto, None) == 1
    assert run.concurrency(auto, 0) == 4


def test_workers_are_packed_node_by_node_over_every_node_type(monkeypatch):
    """Slots of a worker per node (its resources over the worker's need, 1.0 / 0.2 counting
    5), times the most nodes of that type, summed over the types; a resource the worker needs
    none of is not counted; a type that holds no worker adds none, even without a limit."""
    NodeType = capacity.NodeType
    cases = [
        ([NodeType({"CPU": 1.0}, 2)], {"CPU": 0.2}, 10),
        ([NodeType({"CPU": 0.6}, 2)], {"CPU": 0.2}, 6),  # 0.6 / 0.2 is 2.9999999999999996
        ([NodeType({"CPU": 4}, 2), NodeType({"CPU": 8}, 1)], {"CPU": 2}, 2 * 2 + 4),
        ([NodeType({"CPU": 8}, 1), NodeType({"CPU": 48, "GPU": 4}, 4)], {"CPU": 10, "GPU": 1}, 16),
        ([NodeType({"CPU": 8}, 3)], {"CPU": 2, "GPU": 0, "memory": 0}, 12),
        ([NodeType({"CPU": 1}, -1), NodeType({"CPU": 4}, 1)], {"CPU": 2}, 2),
        ([NodeType({"CPU": 4}, -1), NodeType({"CPU": 4}, 1)], {"CPU": 2}, capacity.UNBOUNDED),
    ]
    for types, need, slots in cases:
        monkeypatch.setattr(capacity, "node_types", lambda types=types: types)
        assert capacity.worker_slots(need) == slots, (types, need)


def test_a_gpu_node_type_the_cluster_may_never_start_gives_it_no_gpus(monkeypatch):
    never = [capacity.NodeType({"CPU": 8, "GPU": 1}, 0), capacity.NodeType({"CPU": 8}, 3)]
    monkeypatch.setattr(capacity, "node_types", lambda: never)
    assert not capacity.can_have("GPU") and capacity.can_have("CPU")
    unlimited = [capacity.NodeType({"CPU": 8, "GPU": 1}, -1)]
    monkeypatch.setattr(capacity, "node_types", lambda: unlimited)
    assert capacity.can_have("GPU")


def test_node_types_come_from_the_published_config_else_from_the_nodes_alive(monkeypatch):
    """The head type counts the head node (min and max); a worker type without max_workers
    may have as many as the cluster's max_workers, one with more is held to it. Without a
    published config, each node alive now is a type of one node; a dead one is none."""
    autoscaling = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}},
            "cpu": {"resources": {"CPU": 4}, "min_workers": 1},
            "big": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 10},
        },
    }
    state = ray._private.state.state
    published = capacity.cluster_config(autoscaling)
    monkeypatch.setattr(state, "get_cluster_config", lambda: published)
    groups = {g.name: (g.min_count, g.max_count) for g in published.node_group_configs}
    assert groups == {"head": (1, 1), "cpu": (1, 3), "big": (0, 3)}
    assert capacity.node_types() == [
        capacity.NodeType({"CPU": 2}, 1),
        capacity.NodeType({"CPU": 4}, 3),
        capacity.NodeType({"CPU": 64, "GPU": 8}, 3),
    ]
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert capacity.node_types() == [capacity.NodeType({"CPU": 4.0}, 1)]
    assert not capacity.can_have("GPU")


def test_publishing_names_a_file_that_is_no_autoscaling_config_in_one_line(tmp_path, capsys):
    """--help prints the usage and what the command does, which it left out, in 80 columns; a
    missing file, or one without node types, is one line and status 2 before Ray is
    reached."""
    assert capacity.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m raydeq.training.capacity AUTOSCALING_CONFIG\n\n")
    assert "Publish the node types of a `ray up` autoscaling config" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    missing, empty = tmp_path / "missing.yaml", tmp_path / "empty.yaml"
    empty.write_text("max_workers: 4\n")
    assert capacity.main([str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: {missing}: not an autoscaling config ([Errno 2] No such file or directory: "
        f"'{missing}')\n"
    )
    assert capacity.main([str(empty)]) == 2
    assert capsys.readouterr().err == (
        f"error: {empty}: not an autoscaling config ('available_node_types')\n"
    )
    # Node types that do not build a cluster config (a resource that is no number).
    odd = tmp_path / "odd.yaml"
    odd.write_text("available_node_types:\n  cpu: {resources: {CPU: many}}\n")
    assert capacity.main([str(odd)]) == 2
    assert capsys.readouterr().err == (
        f"error: {odd}: not an autoscaling config (invalid literal for int() with base 10: "
        "'many')\n"
    )


@pytest.mark.parametrize("argv", [[], ["a.yaml", "b.yaml"]])
def test_publishing_takes_one_autoscaling_config_file(capsys, argv):
    assert capacity.main(argv) == 2
    assert capsys.readouterr().err == (
        "usage: python -m raydeq.training.capacity AUTOSCALING_CONFIG\n"
    )


# Ray clusters of their own ----------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class FakeAutoscalingCluster:
    """Ray's AutoscalingCluster (fake node types that join on demand, on this machine), started
    on its own port and process group and stopped by that group, so that it leaves any other
    Ray cluster on the machine alone (AutoscalingCluster runs `ray stop --force`)."""

    # Without token authentication: its processes and drivers share no token file.
    ENV = {"RAY_AUTH_MODE": "disabled"}

    # Heads started, each on a port found free, until one's GCS binds its port.
    TRIES = 3

    def __init__(self, head: dict, worker_types: dict) -> None:
        self.address = ""
        self.config = {
            "cluster_name": "fake",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": "",
            },
            "available_node_types": {
                "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
                **{k: {"node_config": {}, "min_workers": 0, **t} for k, t in worker_types.items()},
            },
            "head_node_type": "ray.head.default",
            "idle_timeout_minutes": 1,
            "upscaling_speed": 1.0,
            # the rest of Ray's fake_multi_node/example.yaml (not in the wheel), all empty
            **dict.fromkeys(("auth", "docker", "file_mounts"), {}),
            **dict.fromkeys(EMPTY_LISTS, []),
            "file_mounts_sync_continuously": False,
        }
        # Short, in Ray's temporary folder rather than the session's: its socket paths are
        # limited to 107 bytes.
        self.folder = tempfile.mkdtemp(prefix="rfc", dir=os.environ["RAY_TMPDIR"])
        self.head: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the head node and its autoscaler, connect, and publish the node types."""
        for tries_left in reversed(range(self.TRIES)):
            if self.start_head(_free_port(), last=not tries_left):
                break
            with contextlib.suppress(ProcessLookupError):  # what is left of that head
                os.killpg(self.head.pid, signal.SIGKILL)
        ray.init(address=self.address, logging_level="WARNING")
        capacity.publish(self.config)  # as cluster.yaml's head_start_ray_commands do

    def start_head(self, port: int, last: bool) -> bool:
        """Start the head node and its autoscaler on `port`; False, unless on the `last` try,
        where its GCS found the port taken (found free, it may be taken before the GCS binds
        it)."""
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        self.config["provider"]["gcs_address"] = self.address
        config = Path(self.folder, "autoscaling.json")
        config.write_text(json.dumps(self.config))
        env = os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"} | self.ENV
        cpus = self.config["available_node_types"]["ray.head.default"]["resources"]["CPU"]
        log = Path(self.folder, "head.log").open("wb")
        self.head = subprocess.Popen(
            [
                *(sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"),
                f"--port={port}",
                f"--num-cpus={cpus}",
                f"--autoscaling-config={config}",
                f"--temp-dir={self.folder}",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        taken = f"Failed to start the grpc server. The specified port is {port}."
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in Path(log.name).read_bytes():
            if not last and self.head.poll() is not None and taken in Path(log.name).read_text():
                return False
            assert self.head.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "the fake cluster did not come up"
            time.sleep(0.5)
        return True

    def stop(self) -> None:
        """Disconnect and kill every process of the cluster (its process group), as `ray stop
        --force` does: on SIGTERM the head, its GCS and its raylet outlived any wait (still
        running 25 s after it), which only delayed this kill."""
        ray.shutdown()
        if self.head is not None:
            os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait()


def _tune_on(address: str, experiment: Path, **env: str) -> subprocess.Popen:
    """Start `python -m raydeq.tune` on the cluster at `address`, storing next to the file, with
    the cluster's environment (`env` on top of this process's)."""
    env = os.environ | {"RAY_ADDRESS": address} | env
    args = [str(experiment), "--storage", str(experiment.parent)]
    return subprocess.Popen(
        [sys.executable, "-m", "raydeq.tune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _watch(samples: list[tuple[int, float]], stop: threading.Event) -> None:
    """Record (nodes alive, CPUs in use) twice a second until `stop` is set."""
    while not stop.is_set():
        alive = sum(node["Alive"] for node in ray.nodes())
        used = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
        samples.append((alive, used))
        time.sleep(0.5)


@pytest.mark.multinode
def test_trials_wait_for_the_nodes_the_autoscaler_adds_and_run_as_many_as_it_can(tmp_path):
    ray.shutdown()
    # Trial workers need 2 CPUs: they fit on neither the head nor a "gpu" node, only on the
    # two "cpu" nodes the autoscaler may add; the gpu type makes `device: auto` claim GPUs.
    cluster = FakeAutoscalingCluster(
        head={"CPU": 1},
        worker_types={
            "cpu": {"resources": {"CPU": 2}, "max_workers": 2},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 1},
        },
    )
    settings = TINY | {
        "train": {"epochs": 1, "max_steps": 4, "report_every": 2, "checkpoint_every": 4},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2, "device": "cpu"},
        "search": {"space": {"seed": {"grid_search": [0, 1, 2]}}, "workers_per_trial": 1},
    }
    (tmp_path / "grow.yaml").write_text(yaml.safe_dump(settings))
    samples: list[tuple[int, float]] = []
    stop = threading.Event()
    try:
        cluster.start()
        auto = validate(TINY | {"scaling": {"device": "auto"}})
        assert ray.cluster_resources().get("GPU", 0) == 0 and launch.gpus_per_worker(auto) == 1.0
        watcher = threading.Thread(target=_watch, args=(samples, stop))
        watcher.start()
        driver = _tune_on(cluster.address, tmp_path / "grow.yaml", **FakeAutoscalingCluster.ENV)
        output = driver.communicate(timeout=150)[0].decode()
        stop.set()
        watcher.join()
    finally:
        stop.set()
        cluster.stop()
    assert driver.returncode == 0, output[-3000:]
    rows = pq.read_table(tmp_path / "grow" / "results.parquet").to_pylist()
    assert [(r["status"], r["step"]) for r in rows] == [("TERMINATED", 4)] * 3
    settings = yaml.safe_load((tmp_path / "grow" / run.SETTINGS_FILE).read_text())
    assert settings["options"]["gpus"] is None and settings["options"]["max_concurrent"] == 0
    nodes = [alive for alive, _ in samples]
    assert nodes[0] == 1 and max(nodes) == 3, nodes
    workers = [round(used / 2) for _, used in samples]  # each trial holds 2 CPUs
    assert max(workers) == 2, workers


def _node_running(pid: int, nodes: list) -> object:
    """The Ray node (of `nodes`) whose raylet started the worker process `pid`."""
    raylet = psutil.Process(pid).ppid()
    return next(n for n in nodes if n.all_processes["raylet"][0].process.pid == raylet)


@pytest.mark.multinode
def test_a_trial_continues_on_another_node_from_its_last_checkpoint_when_its_node_is_lost(
    tmp_path,
):
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]  # one trial worker each
    settings = TINY | {
        "train": {
            "epochs": 1,
            "max_steps": 60,
            "report_every": 10,
            "checkpoint_every": 10,
            "keep_checkpoints": 100,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 2, "device": "cpu", "max_failures": 3},
        "search": {"workers_per_trial": 1},
    }
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump(settings))
    experiment = tmp_path / "lost"
    try:
        driver = _tune_on(cluster.address, tmp_path / "lost.yaml")
        deadline = time.monotonic() + 120
        while max(_newest_steps(experiment).values(), default=0) < 20:
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
            time.sleep(0.1)
        (trial,) = _newest_steps(experiment)
        board = experiment / trial / "train" / reporting.TENSORBOARD_DIR
        (writer,) = board.glob("events.out.tfevents.*")
        worker = int(writer.name.split(".")[-2])
        lost = _node_running(worker, nodes)
        cluster.remove_node(lost, allow_graceful=False)
        # A lost machine takes its processes with it; a worker that outlives its raylet for a
        # moment could otherwise finish a short trial before Ray notices.
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(worker).kill()
        before = _newest_steps(experiment)[trial]
        written = set(_checkpoint_steps(experiment))
        output = driver.communicate(timeout=150)[0].decode()
    finally:
        cluster.shutdown()
    assert driver.returncode == 0, output[-3000:]
    assert 20 <= before < 60
    new = [n for path, n in _checkpoint_steps(experiment) if (path, n) not in written]
    assert min(new) == before + 10, f"did not continue from step {before}: {sorted(new)}"
    assert len(list(board.glob("events.out.tfevents.*"))) == 2
    assert steps_by_tag(board)["train_loss"] == list(range(1, 61))
    steps = _reported_steps(experiment / trial)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps


def test_one_worker_trials_at_once_are_counted_by_what_each_trials_process_holds(monkeypatch):
    """A one-worker trial's process holds cpus_per_worker CPUs (nothing is reserved for a
    driver beside it): a 100-CPU node holds 100 trials of 1 CPU, not 100 / 0.99 = 101, and 64
    trials of 0.25 CPU on a 16-CPU node; with half a GPU each, a 1-GPU node of 8 CPUs holds 2
    trials of 2 CPUs."""
    one = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 1, "cpus_per_worker": 1}})
    assert run.trial_resources(one.trial_config({}), 0) == {"CPU": 1.0}
    monkeypatch.setattr(capacity, "node_types", lambda: [capacity.NodeType({"CPU": 100}, 1)])
    assert run.concurrency(one, 0) == 100
    quarter = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 1, "cpus_per_worker": 0.25}})
    monkeypatch.setattr(capacity, "node_types", lambda: [capacity.NodeType({"CPU": 16}, 1)])
    assert run.concurrency(quarter, 0) == 64
    two = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 1, "cpus_per_worker": 2}})
    gpu_node = [capacity.NodeType({"CPU": 8, "GPU": 1}, 1)]
    monkeypatch.setattr(capacity, "node_types", lambda: gpu_node)
    assert run.concurrency(two, 0.5) == 2
    assert run.trial_workers(two, 0.5) == (1, {"CPU": 2.0, "GPU": 0.5})
