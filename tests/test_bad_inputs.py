"""Bad inputs through the real CLI entry (`hawq_ray.service.cli.main`): each ends in exit status 2 and one line
of stderr that names the input and what would be valid, at once (the timeouts only catch a hang) and before any
expensive work, keeping what was computed. Issue 40: a binary or alias-bomb run.yaml, a corrupt image in an
ImageFolder, a full disk, a Ray address where no cluster answers, and their relatives."""
from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import hawq_ray.service.cli
from hawq_ray.contract import HawqError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(*argv, modules=("run",)):
        monkeypatch.setattr(hawq_ray.service.cli, "COMMAND_MODULES", modules)
        code = hawq_ray.service.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_line_error(code, err, *named):
    """Exit 2 and one error line, the last of stderr (a progress line may come before it), holding every string
    of `named`; no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and lines and "Traceback" not in err, (code, err[-2000:])
    assert [line for line in lines if "error:" in line] == lines[-1:], err[-2000:]
    assert all(n in lines[-1] for n in named) and len(lines[-1]) < 600, lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------------------------ run.yaml
def billion_laughs() -> str:
    """~400 bytes that expand to 9**9 strings under budgets.size (PyYAML builds it by reference, in no time;
    checking or printing it took minutes and then all memory)."""
    lines = ["budgets:", "  size:", '    - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BAD_CONFIGS = {   # file content -> what the one line says
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xfa\xfb" + bytes(range(256)), ["not UTF-8 text", "valid:"]),
    "alias_bomb": (billion_laughs().encode(), ["holds more than 10000 values (YAML aliases expanded)", "valid:"]),
    "recursive_alias": (b"budgets: {size: &a [*a]}\n", ["refers to a value that contains it"]),
    "list": (b"- model: resnet18\n", ["holds a list", "not a mapping of settings"]),
    "empty_list": (b"[]\n", ["holds a list"]),
    "scalar": (b"resnet18\n", ["holds a str", "not a mapping"]),
    "not_yaml": (b"seed: 1\n  bad: [\n", ["not valid YAML at line 2", "valid:"]),
    "nul_byte": (b"seed: 1\x00\n", ["valid:"]),
    "nested_too_deep": (b"budgets: " + b"[" * 2000 + b"]" * 2000 + b"\n", ["valid:"]),
    "duplicate_key": (b"seed: 1\nseed: 2\n", ["key 'seed' at line 2 appears twice"]),
    "huge_integer": (b"seed: " + b"9" * 5000 + b"\n", ["the integer at line 1 has 5000 digits"]),
    "nan_budget": (b"budgets: {size: [.nan]}\n", ["budgets.size: [nan]", "fractions from 0 to 1"]),
    "inf_lr": (b"tune: {lr: .inf}\n", ["tune.lr: inf", "valid:"]),
    "huge_input_size": (b"input_size: 99999999\n", ["input_size: 99999999", "valid: an integer from 8"]),
    "long_budget_list": (("budgets: {size: [" + ", ".join(["0.5"] * 5000) + ", 2]}\n").encode(),
                         ["budgets.size: [0.5, 0.5", "...]"]),
    "too_many_values": (("budgets: {size: [" + ", ".join(["0.5"] * 20000) + "]}\n").encode(),
                        ["the value at line 1 holds more than 10000 values"]),
    "long_key": (("? " + "x" * 200000 + "\n: 1\n").encode(), ["unknown setting 'xxx", "...", "valid:"]),
    "section_not_mapping": (b"tune: 3\n", ["setting 'tune' must be a mapping, not 3"]),
    "unknown_budget": (b"budgets: {flops: [0.5]}\n", ["unknown resource 'flops'", "valid: size, bops, latency"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_run_yaml_is_one_line_and_exit_2(cli, tmp_path, name):
    content, said = BAD_CONFIGS[name]
    config = tmp_path / f"{name}.yaml"
    config.write_bytes(content)
    code, _, err = cli("run", "--config", config, "--out", tmp_path / "run")
    line = one_line_error(code, err, *said)
    assert str(config) in line or "budgets" in line or "input_size" in line or "tune" in line or "seed" in line
    assert not (tmp_path / "run").exists()          # refused before the run folder is made


def test_run_yaml_over_1_mib_is_refused_unread(cli, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("# padding\n" * 200000)
    code, _, err = cli("run", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, str(config), "larger than 1 MiB")


def test_run_yaml_that_is_a_folder_or_a_fifo(cli, tmp_path):
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    code, _, err = cli("run", "--config", folder, "--out", tmp_path / "run")
    one_line_error(code, err, str(folder), "is a folder")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)                                   # reading one would wait for a writer forever
    code, _, err = cli("run", "--config", fifo, "--out", tmp_path / "run")
    one_line_error(code, err, str(fifo), "not a regular file")


def test_run_yaml_aliases_within_bounds_are_kept(tmp_path):
    from hawq_ray.service.pipeline import load_config
    config = tmp_path / "run.yaml"
    config.write_text("profile: {target: &t {kind: llvm, mcpu: skylake}}\ndeploy: {target: *t}\n")
    cfg = load_config(config)
    assert cfg["deploy"]["target"] == cfg["profile"]["target"] == {"kind": "llvm", "mcpu": "skylake"}


def test_an_input_size_the_model_cannot_take_is_one_line_naming_the_shape(tmp_path, cli):
    """pytorchcv's resnet18 ends in a fixed 7 x 7 average pool: at 16 x 16 its first forward pass fails, which
    is one line naming the shape and the setting, not torch's traceback."""
    config = tmp_path / "run.yaml"
    config.write_text("model: resnet18\ninput_size: 16\n")
    code, _, err = cli("run", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, "ResNet does not run on an input of shape (3, 16, 16)", "input_size: null")


def test_the_deploy_target_is_the_profiles_unless_given(tmp_path):
    """Latency budgets are priced on the profiled kernels: a run that names only the profile's ISA deploys for
    it (so the report can set measured latency beside predicted); a deploy target of its own is kept."""
    from hawq_ray.service.pipeline import load_config
    config = tmp_path / "run.yaml"
    config.write_text("profile: {target: avx2}\n")
    assert load_config(config)["deploy"]["target"] == "avx2"
    assert load_config(config, {"deploy": {"target": "avx512"}})["deploy"]["target"] == "avx512"
    assert load_config()["deploy"]["target"] == load_config()["profile"]["target"] == "llvm"


def test_error_messages_show_at_most_80_characters_of_a_value():
    from hawq_ray.contract.errors import brief
    deep = []
    deep.append(deep)
    for value in (list(range(10 ** 6)), "x" * 10 ** 6, 10 ** 5000, deep, {i: [i] * 100 for i in range(1000)}):
        assert len(brief(value)) <= 80
    assert brief(10 ** 5000) == "<an integer of 5001 digits>" and brief([0.5, 2]) == "[0.5, 2]"


# ------------------------------------------------------------------------------------------------ images
def image_folder(root: Path, per_class: int = 3, suffix: str = "png") -> Path:
    for split in ("train", "val"):
        for name, color in (("red", (255, 0, 0)), ("teal", (0, 128, 128))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 10), color).save(folder / f"{i}.{suffix}")
    return root


def test_corrupt_jpeg_in_run_yaml_data_is_named_before_any_work(cli, tmp_path):
    root = image_folder(tmp_path / "pics", suffix="jpg")
    bad = root / "train" / "teal" / "1.jpg"
    bad.write_bytes(os.urandom(600))
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {root}\n")
    code, _, err = cli("run", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, f"data image {bad}", "not an image PIL reads", "valid: an image file")
    assert not (tmp_path / "run").exists()


def test_corrupt_or_truncated_image_given_as_data_option(cli, tmp_path):
    root = image_folder(tmp_path / "pics")
    bad = root / "train" / "red" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    code, _, err = cli("verify", "--data", root, modules=("quant",))
    one_line_error(code, err, f"data image {bad}", "valid:")
    bad.unlink()
    truncated = root / "train" / "red" / "0.png"      # the header reads; the pixels end early
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    code, _, err = cli("verify", "--data", root, modules=("quant",))
    one_line_error(code, err, f"data image {truncated}", "cannot be decoded", "valid:")


def test_image_folder_without_images_or_with_a_fifo(cli, tmp_path):
    root = image_folder(tmp_path / "pics")
    for f in (root / "val" / "red").iterdir():
        f.unlink()
    (root / "val" / "red" / "readme.txt").write_text("no images here")
    code, _, err = cli("verify", "--data", root, modules=("quant",))
    one_line_error(code, err, f"data path {root / 'val'}", "Found no valid file for the classes red",
                   "valid: train/ and val/")
    Image.new("RGB", (20, 10)).save(root / "val" / "red" / "0.png")
    os.mkfifo(root / "val" / "red" / "1.png")     # opening it would wait forever
    code, _, err = cli("verify", "--data", root, modules=("quant",))
    one_line_error(code, err, f"data image {root / 'val' / 'red' / '1.png'}", "not a regular file")


# ------------------------------------------------------------------------------------------------ full disk
def fake_run(stages):
    """A stand-in for pipeline.run that runs `stages` [(name, compute)] through the real `cached_stage`."""
    from hawq_ray.service import pipeline

    def run(cfg, out, address=None, **_):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, compute in stages:
            pipeline.cached_stage(out, name, "key", compute, log=lambda *_: None)
    return run


def test_full_disk_in_a_stage_is_one_line_and_keeps_finished_stages(cli, tmp_path, monkeypatch):
    from hawq_ray.service import pipeline
    checkpoint = tmp_path / "run" / "finetune" / "epoch_0001" / "state.pt"

    def finetune():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint))

    monkeypatch.setattr(pipeline, "run", fake_run([("layers", lambda: pd.DataFrame({"a": [1]})),
                                                   ("finetune", finetune)]))
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "disk full (No space left on device) while writing the finetune stage",
                   str(checkpoint), "free space", "finished stages are kept")
    assert pipeline._done(tmp_path / "run")["layers"]["rows"] == 1          # the finished stage is recorded
    assert pd.read_parquet(tmp_path / "run" / "layers.parquet")["a"].tolist() == [1]


def test_full_disk_while_writing_a_table_names_the_table(cli, tmp_path, monkeypatch):
    from hawq_ray.service import pipeline

    def no_space(self, *args, **kwargs):         # as pyarrow says it: errno 28, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", no_space)
    monkeypatch.setattr(pipeline, "run", fake_run([("sweep", lambda: pd.DataFrame({"a": [1]}))]))
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "disk full", "while writing the sweep stage", "sweep.parquet")


def test_exhausted_quota_and_torch_writer_on_a_full_disk(cli, tmp_path, monkeypatch):
    from hawq_ray.service import pipeline

    def quota(*_, **__):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "run" / "run.json"))

    monkeypatch.setattr(pipeline, "run", quota)
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "disk full (Disk quota exceeded) while writing", "run.json")

    def torch_writer(*_, **__):                  # what torch.save raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(pipeline, "run", torch_writer)
    monkeypatch.setattr(hawq_ray.service.cli, "_free_bytes", lambda path: 0)
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "disk full")
    monkeypatch.setattr(hawq_ray.service.cli, "_free_bytes", lambda path: 10 ** 12)
    with pytest.raises(RuntimeError, match="inline_container"):           # with space free: not a full disk
        cli("run", "--out", tmp_path / "run")


def test_full_disk_in_a_ray_task(cli, tmp_path, monkeypatch):
    from ray.exceptions import RayTaskError
    from hawq_ray.service import pipeline
    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/scratch/trial_0/state.pt")
    wrapped = RayTaskError("train", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()

    def raises(*_, **__):
        raise wrapped

    monkeypatch.setattr(pipeline, "run", raises)
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "disk full (No space left on device) while writing /scratch/trial_0/state.pt")


def test_other_os_errors_still_raise(cli, tmp_path, monkeypatch):
    from hawq_ray.service import pipeline

    def denied(*_, **__):
        raise PermissionError(errno.EACCES, "Permission denied", "/x")

    monkeypatch.setattr(pipeline, "run", denied)
    with pytest.raises(PermissionError):
        cli("run", "--out", tmp_path / "run")


def test_error_raised_in_a_ray_task_prints_its_own_line(cli, tmp_path, monkeypatch):
    from ray.exceptions import RayTaskError
    from hawq_ray.service import pipeline
    wrapped = RayTaskError("train", "Traceback (most recent call last):\n  ...\nHawqError: x",
                           HawqError("data image /d/1.png: not an image PIL reads; valid: ...")).as_instanceof_cause()

    def raises(*_, **__):
        raise wrapped

    monkeypatch.setattr(pipeline, "run", raises)
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "error: data image /d/1.png: not an image PIL reads")


# ------------------------------------------------------------------------------------------------ Ray address
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:{closed}"])
def test_address_where_nobody_listens(cli, tmp_path, address):
    address = address.format(closed=closed_port())
    code, _, err = cli("run", "--address", address, "--out", tmp_path / "run")
    one_line_error(code, err, f"cannot reach a Ray cluster at {address} within", "valid: HOST:PORT")


def test_address_that_accepts_but_is_no_ray_head(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("hawq_ray.service.session.JOIN_TIMEOUT_S", 1.0)
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.extend(server.accept() for _ in range(4)), daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        code, _, err = cli("run", "--address", address, "--out", tmp_path / "run")
    finally:
        server.close()
    one_line_error(code, err, f"cannot reach a Ray cluster at {address} within 1 s",
                   "accepts connections but does not answer as a Ray head")


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "headnode", "headnode:port", "headnode:99999",
                                     ":6379", "a b:6379", "x" * 300 + ":6379"])
def test_malformed_address(cli, tmp_path, address):
    code, _, err = cli("run", "--address", address, "--out", tmp_path / "run")
    one_line_error(code, err, "Ray address", "is not valid", "valid: HOST:PORT")


def test_malformed_address_from_the_environment(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "not-an-address")
    code, _, err = cli("run", "--out", tmp_path / "run")
    one_line_error(code, err, "Ray address 'not-an-address' (from $RAY_ADDRESS) is not valid")


@pytest.fixture
def fake_gcs():
    """A gRPC server on a free port that answers GetClusterId as a Ray head's GCS does: with a cluster id, or
    (token authentication on, no token sent) UNAUTHENTICATED."""
    from concurrent import futures

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    class Gcs(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        token = False

        def GetClusterId(self, request, context):
            if self.token:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
            return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)

    gcs = Gcs()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(gcs, server)
    gcs.port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    yield gcs
    server.stop(0)


def test_address_of_a_ray_head_passes_the_check(fake_gcs):
    from hawq_ray.service.session import reachable
    assert reachable(f"127.0.0.1:{fake_gcs.port}", timeout=5).endswith(f":{fake_gcs.port}")


def test_address_of_a_head_that_needs_a_token_this_driver_lacks(cli, tmp_path, fake_gcs, monkeypatch):
    fake_gcs.token = True
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    address = f"127.0.0.1:{fake_gcs.port}"
    code, _, err = cli("run", "--address", address, "--out", tmp_path / "run")
    one_line_error(code, err, f"cannot join the Ray cluster at {address}: it needs token authentication",
                   "valid: RAY_AUTH_MODE=token")
    from hawq_ray.service.session import reachable
    monkeypatch.setenv("RAY_AUTH_MODE", "token")      # ray.init sends the token: the check lets it through
    assert reachable(address, timeout=5)


# ------------------------------------------------------------------------------------------------ code in a run.yaml
def test_a_run_yaml_may_not_name_code_to_run(tmp_path, monkeypatch):
    """`package.module:callable` imports and calls code: a run.yaml (data from anyone) may not name it as the
    model or the teacher; the command line and the Python API may (the user's own choice)."""
    from hawq_ray.service.cli import build_parser
    from hawq_ray.service.pipeline import load_config
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    config = tmp_path / "run.yaml"
    for text, key in (("model: os:system\n", "model"), ("tune: {teacher: 'os:system=w.pt'}\n", "tune.teacher")):
        config.write_text(text)
        with pytest.raises(HawqError) as e:
            load_config(config)
        assert f"{key} 'os:system' names Python code to run" in str(e.value) and "\n" not in str(e.value)
    config.write_text("model: torchvision:resnet18\ntune: {teacher: resnet18}\n")
    assert load_config(config)["model"] == "torchvision:resnet18"
    assert load_config(config, {"model": "mypkg.nets:build"})["model"] == "mypkg.nets:build"
    assert build_parser().parse_args(["run", "--model", "mypkg.nets:build"]).model == "mypkg.nets:build"


def test_an_empty_run_yaml_holds_the_defaults(tmp_path):
    from hawq_ray.service.pipeline import load_config
    config = tmp_path / "run.yaml"
    for text in ("", "# every setting commented out\n# tune: {epochs: 2}\n"):
        config.write_text(text)
        assert load_config(config) == load_config(None)
