"""deploy/: every Kubernetes manifest validates against the Kubernetes schemas, and the images,
ports, flags and paths in the manifests and Dockerfiles agree with the code.

Built-in kinds are validated with kubernetes-validate (the Kubernetes OpenAPI schemas bundled
in the package, strict: unknown fields are errors; no network). The two custom resources,
LeaderWorkerSet and ServiceMonitor, are validated against deploy/schemas/ (written for the
fields these manifests use, with pod templates and label selectors checked against
Kubernetes' own definitions from the same package). Server command lines are parsed by
vLLM's own ``vllm serve`` parser with the CSR flags registered, so an unknown or misspelt flag
fails here; CSR flag names come from ``csr_vllm.plugin.CSR_FLAGS`` only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu",
               "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
GRAFANA_DASHBOARD = DEPLOY / "grafana" / "csr-vllm.json"
K8S_VERSION = "1.32.0"  # oldest Kubernetes release the manifests are checked against
CRD_SCHEMAS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"):
               SCHEMAS / "leaderworkerset-x-k8s-io-v1.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"):
               SCHEMAS / "servicemonitor-monitoring-coreos-com-v1.json"}
PORT = 8000
# What LWS injects into every container (values only for parsing the command lines here).
LWS_ENV = {"LWS_LEADER_ADDRESS": "csr-vllm-mn-0.csr-vllm-mn.default", "LWS_WORKER_INDEX": "1"}


# -- loading -----------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@cache
def documents() -> list[tuple[str, dict]]:
    out = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


@cache
def k8s_definitions() -> Resource:
    """Kubernetes' own definitions, as bundled by kubernetes-validate (strict variant)."""
    import importlib.resources as res

    version = [v for v in kubernetes_validate.utils.all_versions()
               if kubernetes_validate.utils.major_minor(v)
               <= kubernetes_validate.utils.major_minor(K8S_VERSION)][-1]
    path = res.files("kubernetes_validate") / "kubernetes-json-schema" / \
        f"v{version}-local-strict" / "_definitions.json"
    return Resource.from_contents(json.loads(path.read_text()))


def validate(doc: dict) -> None:
    """Raise if ``doc`` is not a valid object of its kind."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        registry = Registry().with_resource(k8s_definitions().contents["$id"],
                                            k8s_definitions())
        jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_specs() -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod template in the manifests."""
    out = []
    for d in by_kind("Deployment"):
        out.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
    for d in by_kind("LeaderWorkerSet"):
        t = d["spec"]["leaderWorkerTemplate"]
        out.append((d["metadata"]["name"] + "/leader", t["leaderTemplate"]["spec"]))
        out.append((d["metadata"]["name"] + "/worker", t["workerTemplate"]["spec"]))
    return out


def server_containers() -> list[tuple[str, dict, dict]]:
    """(name, container, pod spec) of every container that runs ``vllm serve``."""
    return [(f"{name}/{c['name']}", c, spec) for name, spec in pod_specs()
            for c in spec["containers"] if c.get("command") == ["vllm", "serve"]]


def expand(arg: str) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: LWS_ENV[m.group(1)], arg)


@cache
def serve_parser():
    """vLLM's own ``vllm serve`` argument parser, with csr-vllm's flags registered."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from csr_vllm.plugin import register

    register()
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def parse_serve(args: list[str]):
    try:
        return serve_parser().parse_args([expand(a) for a in args])
    except SystemExit as e:
        raise AssertionError(f"vllm serve rejects {args}") from e


def flags(args: list[str]) -> dict[str, str | None]:
    out = {}
    for a in args:
        if a.startswith("--"):
            name, _, value = a.partition("=")
            out[name] = value or None
    return out


def dockerfile(path: Path) -> dict[str, list]:
    """Instructions of a Dockerfile (continuation lines joined): {INSTRUCTION: [args, ...]}."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: dict[str, list] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.setdefault(op.upper(), []).append(rest.strip())
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- schema validation -------------------------------------------------------------------------
def test_there_are_manifests_of_every_required_kind():
    kinds = {d["kind"] for _, d in documents()}
    assert {"Deployment", "Service", "LeaderWorkerSet", "ServiceMonitor",
            "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("name", [n for n, _ in documents()])
def test_manifest_is_valid(name):
    validate(dict(documents())[name])


def test_the_validator_rejects_broken_manifests():
    """The checks are real: a misspelt field, a wrong type or a bad enum fails, built-in kinds
    and custom resources alike."""
    dep = copy.deepcopy(by_kind("Deployment")[0])
    dep["spec"]["replica"] = 2  # misspelt
    lws = copy.deepcopy(by_kind("LeaderWorkerSet")[0])
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
    lws_pod = copy.deepcopy(by_kind("LeaderWorkerSet")[0])
    lws_pod["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0][
        "imagePulPolicy"] = "Always"  # inside the pod template: Kubernetes' own schema
    sm = copy.deepcopy(by_kind("ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    svc = copy.deepcopy(by_kind("Service")[0])
    svc["spec"]["ports"][0]["port"] = "http"
    for bad in (dep, lws, lws_pod, sm, svc):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


def test_kustomizations_reference_existing_files():
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        validate_kustomization_shape(k, kfile)
        for res in k.get("resources", []):
            target = (kfile.parent / res).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), \
                f"{kfile}: resource {res} not found"
            # kustomize's default load restrictor: nothing outside deploy/ (the root).
            assert DEPLOY in target.parents or target == DEPLOY
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                src = (kfile.parent / f.split("=")[-1]).resolve()  # [key=]path
                assert kfile.parent in src.parents, f"{kfile}: {f} outside its folder"


def validate_kustomization_shape(k: dict, where: Path) -> None:
    assert k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", where
    assert k.get("kind") == "Kustomization", where
    allowed = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"}
    assert set(k) <= allowed, f"{where}: unexpected keys {set(k) - allowed}"


def test_every_manifest_is_in_a_kustomization():
    listed = set()
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kfile.read_text()).get("resources", []):
            listed.add((kfile.parent / res).resolve())
    assert set(p.resolve() for p in manifest_files()) <= listed


def test_grafana_dashboard_is_mounted_from_its_file():
    """The dashboard ConfigMap is generated from deploy/grafana/csr-vllm.json (one copy) and,
    rendered the way kustomize renders it, is a valid ConfigMap that Grafana's sidecar finds."""
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (gen,) = k["configMapGenerator"]
    (entry,) = gen["files"]
    key, _, src = entry.partition("=")
    assert (DEPLOY / src).resolve() == GRAFANA_DASHBOARD.resolve()
    assert GRAFANA_DASHBOARD.is_file(), f"{GRAFANA_DASHBOARD} is missing"
    text = GRAFANA_DASHBOARD.read_text()
    json.loads(text)  # a dashboard is JSON
    labels = k["generatorOptions"]["labels"]
    assert labels.get("grafana_dashboard") == "1"
    validate({"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": gen["name"], "labels": labels}, "data": {key: text}})


# -- agreement with the code -------------------------------------------------------------------
def test_image_tags_agree_with_the_package():
    version = pyproject()["project"]["version"]
    (cuda_pin,) = pyproject()["project"]["optional-dependencies"]["cuda"]
    vllm_version = cuda_pin.split("==")[1]
    cpu_pin = pyproject()["project"]["optional-dependencies"]["cpu"][0]
    assert cpu_pin.split("==")[1] == vllm_version  # CPU and CUDA builds of the same vLLM
    assert dockerfile(DOCKERFILES["cuda"])["FROM"] == [f"vllm/vllm-openai:v{vllm_version}"]
    assert dockerfile(DOCKERFILES["cpu"])["FROM"][0].startswith("python:3.11")
    for kind, path in DOCKERFILES.items():
        assert f"-t csr-vllm:{version}-{kind} " in path.read_text(), path
    images = {c["image"] for _, spec in pod_specs()
              for c in spec["containers"] + spec.get("initContainers", [])}
    assert images and images <= {f"csr-vllm:{version}-cpu", f"csr-vllm:{version}-cuda"}


def test_dockerfiles_install_csr_vllm_and_serve_with_csr():
    for path in DOCKERFILES.values():
        ins = dockerfile(path)
        assert json.loads(ins["ENTRYPOINT"][0]) == ["vllm", "serve"]
        cmd = json.loads(ins["CMD"][0])
        args = parse_serve(cmd)
        assert args.kv_cache_backend == "csr" and args.port == PORT
        assert args.host == "0.0.0.0"
        assert ins["EXPOSE"] == [str(PORT)]
        assert any("--force-reinstall ." in r for r in ins["RUN"])  # `vllm` = the launcher
        copied = {src for c in ins["COPY"] for src in c.split()[:-1]}
        # Every source folder pyproject.toml installs from, the metadata, and deploy/ (the
        # init containers' validate_dictionary.py).
        sources = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
        assert sources | {"pyproject.toml", "README.md", "deploy"} <= copied, path
        assert ins["WORKDIR"] == ["/opt/csr-vllm"]


def test_server_command_lines_parse_and_use_known_csr_flags():
    from csr_vllm.plugin import CSR_FLAGS

    containers = server_containers()
    assert len(containers) == 3  # single-node, LWS leader, LWS worker
    for name, c, _ in containers:
        args = parse_serve(c["args"])
        assert args.kv_cache_backend == "csr", name
        used = {f for f in flags(c["args"]) if f.startswith("--csr-")}
        assert used <= set(CSR_FLAGS), f"{name}: unknown CSR flags {used - set(CSR_FLAGS)}"
        assert {"--csr-dict", "--csr-preset"} <= used, name


def test_ports_and_probes_agree():
    services = by_kind("Service")
    for name, c, _ in server_containers():
        args = parse_serve(c["args"])
        if args.headless:  # LWS workers: no API server, no probes
            assert "readinessProbe" not in c and "livenessProbe" not in c
            continue
        assert args.port == PORT and args.host == "0.0.0.0", name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == PORT
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health" and get["port"] in ("http", PORT), (name, probe)
    for svc in services:
        (port,) = svc["spec"]["ports"]
        assert port["name"] == "http" and port["port"] == PORT and port["targetPort"] == "http"
    (sm,) = by_kind("ServiceMonitor")
    assert all(e["port"] == "http" and e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    # The ServiceMonitor selects every csr-vllm Service.
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(sel.items() <= svc["metadata"]["labels"].items() for svc in services)


def test_services_select_the_serving_pods():
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind("Deployment")]
    leaders = [d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
               for d in by_kind("LeaderWorkerSet")]
    workers = [d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
               for d in by_kind("LeaderWorkerSet")]
    for svc in by_kind("Service"):
        sel = svc["spec"]["selector"].items()
        hits = [t for t in templates + leaders if sel <= t.items()]
        assert len(hits) == 1, svc["metadata"]["name"]
        assert not any(sel <= w.items() for w in workers)  # headless workers serve nothing


def test_paths_and_parallel_sizes_agree():
    """The dictionary and model the server loads are on the mounted volumes, and the init
    container validates exactly those for the same tensor/pipeline sizes."""
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for name, c, spec in server_containers():
        args = parse_serve(c["args"])
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in (args.csr_dict, args.model_tag):
            mount = next((m for m in mounts if path.startswith(m + "/")), None)
            assert mount, f"{name}: {path} is on no volume"
            claim = volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims
        assert "/dev/shm" in mounts  # vLLM's workers talk over shared memory
        (init,) = spec["initContainers"]
        assert init["command"] == ["python3", "/opt/csr-vllm/deploy/validate_dictionary.py"]
        check = flags(init["args"])
        assert check["--model"] == args.model_tag and check["--dict"] == args.csr_dict
        assert check["--preset"] == args.csr_preset
        assert int(check["--tensor-parallel-size"]) == args.tensor_parallel_size
        assert int(check["--pipeline-parallel-size"]) == args.pipeline_parallel_size
        assert {m["mountPath"] for m in init["volumeMounts"]} <= set(mounts)
    # The Dockerfiles copy deploy/ to where the init containers run the script from.
    assert (DEPLOY / "validate_dictionary.py").is_file()


def test_multi_node_group_matches_the_parallel_layout():
    (lws,) = by_kind("LeaderWorkerSet")
    t = lws["spec"]["leaderWorkerTemplate"]
    leader = parse_serve(t["leaderTemplate"]["spec"]["containers"][0]["args"])
    worker = parse_serve(t["workerTemplate"]["spec"]["containers"][0]["args"])
    assert leader.nnodes == worker.nnodes == t["size"]
    world = leader.tensor_parallel_size * leader.pipeline_parallel_size
    assert world % leader.nnodes == 0
    assert leader.node_rank == 0 and worker.headless and not leader.headless
    assert leader.master_addr == worker.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]
    assert leader.master_port == worker.master_port
    for a in ("tensor_parallel_size", "pipeline_parallel_size", "csr_dict", "csr_preset",
              "model_tag", "kv_cache_backend", "max_model_len"):
        assert getattr(leader, a) == getattr(worker, a), a


# -- the init container's check, for real ------------------------------------------------------
def load_validate_dictionary():
    """deploy/validate_dictionary.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_dictionary",
                                                  DEPLOY / "validate_dictionary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_validate_dictionary_reports_each_workers_share(model_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import DictionarySet, ModelShape
    from csr_vllm.codec.identity import identity_dictionary

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    good, bad = tmp_path / "good", tmp_path / "bad"
    # The lossless dictionary with its own copy per layer and KV head: every worker of
    # TP 3 x PP 2 needs one sixth of it.
    shared = identity_dictionary(shape)
    eye = shared.key_atoms[0, 0]
    atoms = eye.expand(shape.num_layers, shape.num_kv_heads, *eye.shape).contiguous()
    config = dataclasses.replace(shared.config, layer_group=1, per_head=True)
    DictionarySet(config, shape, atoms, atoms.clone()).save(good)
    identity_dictionary(ModelShape("LlamaForCausalLM", 12, 3, 64, 10000.0)).save(bad)
    check = load_validate_dictionary()
    run = ["--model", str(model_dir), "--preset", "none"]
    assert check.main(run + ["--dict", str(good), "--tensor-parallel-size", "3",
                             "--pipeline-parallel-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    workers = out["workers"]
    assert len(workers) == 6
    assert [w["layers"] for w in workers] == [[0, 15]] * 3 + [[15, 30]] * 3
    assert [w["kv_heads"] for w in workers] == [[0, 1], [1, 2], [2, 3]] * 2
    assert out["dictionary_bytes_total"] == 2 * atoms.nbytes
    assert all(w["dictionary_bytes"] * 6 == out["dictionary_bytes_total"] for w in workers)
    assert check.main(run + ["--dict", str(bad)]) == 1
    refused = capsys.readouterr()
    assert "made for another model" in refused.err and "num_layers" in refused.err
