"""Faults on disk (issue 13, items 1-3 and 10): crash-safe saves, all-or-nothing loads, reads confined
to the saved directory, and load errors that name the file.

The crash tests are real: a subprocess saves a ~50 MB model over an existing save, is stopped at a
named crash point (``LLMOPT_PAUSE_AT``, see ``llmopt/core/files.py``: deterministic, no timing luck)
and killed with ``SIGKILL``; the directory must then load the complete old model or the complete
new one, bit-exact.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llmopt
from llmopt.io import LoadError
from llmopt.testing import ToyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
# ~52 MB: 16 blocks of a 1024x1024 projection (every 4th int4-compressed, the rest float32) and a norm.
WIDTH, DEPTH = 1024, 16
SHARD_BYTES = 6 * 2**20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)


class BigModel(nn.Module):
    """The model the crash tests save: deterministic from its seed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))


def build(seed: int) -> BigModel:
    torch.manual_seed(seed)
    model = BigModel()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # LayerNorm weights too: every tensor differs between seeds
    llmopt.compress_(model, llmopt.RTN("int4", 64), include=[f"blocks.{i}.proj" for i in range(0, DEPTH, 4)])
    return model


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(
        mine[k].dtype == state[k].dtype and torch.equal(mine[k], state[k]) for k in state)


def _load(directory) -> BigModel:
    with torch.device("meta"):
        skeleton = BigModel()
    return llmopt.load(skeleton, directory)


@pytest.fixture(scope="module")
def states():
    return {seed: _state(build(seed)) for seed in (0, 1)}


def _save_in_subprocess(directory, seed: int, shard_bytes: int, pause_at: str) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import torch; torch.set_num_threads(1); "
            f"import llmopt, test_faults as t; "
            f"llmopt.save(t.build({seed}), {str(directory)!r}, max_shard_bytes={shard_bytes})")
    env = dict(os.environ, LLMOPT_PAUSE_AT=pause_at, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def _kill_when_paused(proc: subprocess.Popen, point: str, timeout: float = 180.0) -> None:
    """Wait for the child to announce it stopped at ``point``, then ``kill -9`` it."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if b"llmopt: paused at " + point.encode() in seen:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                assert proc.returncode == -signal.SIGKILL
                return
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait(30)
    pytest.fail(f"the saving process never paused at {point}: exit {proc.returncode}\n{seen.decode()[-3000:]}")


def _listing(directory):
    return sorted(os.listdir(directory))


def _referenced(directory):
    names = llmopt.io.read_manifest(directory)["tensors"]
    return [names] if isinstance(names, str) else names


# Each named crash point, whether the directory must then hold the old save or the new one, and the
# layouts (one file: the default shard size; sharded: 6 MB shards) it applies to. `shard_write:2` is
# in the middle of the second shard file; `shard_rename:2` is between the second and third rename,
# the point where the old layout mixed shards of two saves; `manifest_write` is half-way through
# llmopt.json's temporary file, `manifest_write_replace` just before it replaces llmopt.json, and
# `cleanup` after the commit, before the old files are removed.
CRASH_POINTS = [
    ("shard_write:1", "old", ("single", "sharded")),
    ("shard_write:2", "old", ("sharded",)),
    ("shard_rename:1", "old", ("single", "sharded")),
    ("shard_rename:2", "old", ("sharded",)),
    ("manifest_write:None", "old", ("single", "sharded")),
    ("manifest_write_replace:None", "old", ("single", "sharded")),
    ("cleanup:None", "new", ("single", "sharded")),
]
CASES = [(point, expect, layout) for point, expect, layouts in CRASH_POINTS for layout in layouts]


@pytest.mark.parametrize("point,expect,layout", CASES, ids=[f"{p.split(':')[0]}{p.split(':')[1] if p[-4:] != 'None' else ''}-{lay}" for p, _, lay in CASES])
def test_kill_at_each_crash_point_leaves_old_or_new_save(tmp_path, states, point, expect, layout):
    shard_bytes = SHARD_BYTES if layout == "sharded" else 2**30
    old = build(0)
    llmopt.save(old, tmp_path, max_shard_bytes=shard_bytes)
    if layout == "sharded":
        assert len(_referenced(tmp_path)) >= 8  # several shards, with the same names the new save would use
    del old
    proc = _save_in_subprocess(tmp_path, 1, shard_bytes, point)
    _kill_when_paused(proc, point)

    loaded = _load(tmp_path)
    assert _same(loaded, states[0 if expect == "old" else 1]), f"after kill -9 at {point}: not the {expect} save"
    del loaded
    # The next save cleans whatever the killed one left, and leaves exactly its own files.
    llmopt.save(build(1), tmp_path, max_shard_bytes=shard_bytes)
    assert _listing(tmp_path) == sorted(_referenced(tmp_path) + ["llmopt.json"])
    assert _same(_load(tmp_path), states[1])


def test_pause_points_are_inert_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOPT_PAUSE_AT", raising=False)
    llmopt.save(ToyMLP(), tmp_path)
    assert _listing(tmp_path) == ["llmopt.json", "model.safetensors"]


# ------------------------------------------------------------------------------------- exceptions
def _small(seed: int = 0) -> ToyMLP:
    torch.manual_seed(seed)
    model = ToyMLP()
    llmopt.compress_(model, llmopt.RTN("int4", 32), include=["up"])
    return model


def _snapshot_dir(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("shards", [None, 2000])
def test_unserialisable_metadata_over_a_save_changes_nothing(tmp_path, shards):
    kwargs = {} if shards is None else {"max_shard_bytes": shards}
    llmopt.save(_small(0), tmp_path, **kwargs)
    before = _snapshot_dir(tmp_path)
    with pytest.raises(TypeError, match=r"metadata\['note'\] is not JSON-serialisable.*nothing was written"):
        llmopt.save(_small(1), tmp_path, metadata={"ok": 1, "note": object()}, **kwargs)
    assert _snapshot_dir(tmp_path) == before
    loaded = llmopt.load(ToyMLP(), tmp_path)
    assert _same(loaded, _state(_small(0)))


def test_exception_between_shards_leaves_old_save_and_no_stray_files(tmp_path, monkeypatch):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    before = _snapshot_dir(tmp_path)
    save_module = sys.modules["llmopt.io.save"]

    real = save_module._write_tensor_file
    calls = []

    def failing(path, tensors, metadata, index):
        calls.append(index)
        if index == 2:
            raise OSError(28, "No space left on device")
        real(path, tensors, metadata, index)

    monkeypatch.setattr(save_module, "_write_tensor_file", failing)
    with pytest.raises(OSError, match="No space left"):
        llmopt.save(_small(1), tmp_path, max_shard_bytes=2000)
    assert calls == [1, 2]
    assert _snapshot_dir(tmp_path) == before


def test_exception_at_manifest_write_leaves_old_save(tmp_path, monkeypatch):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    before = _snapshot_dir(tmp_path)
    save_module = sys.modules["llmopt.io.save"]

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(save_module, "write_bytes_atomic", failing)
    with pytest.raises(OSError):
        llmopt.save(_small(1), tmp_path, max_shard_bytes=2000)
    assert _snapshot_dir(tmp_path) == before


def test_meta_tensor_is_refused_before_writing(tmp_path):
    llmopt.save(_small(0), tmp_path)
    before = _snapshot_dir(tmp_path)
    model = _small(1)
    model.down.weight = nn.Parameter(torch.empty_like(model.down.weight, device="meta"))
    with pytest.raises(ValueError, match="down.weight.*meta"):
        llmopt.save(model, tmp_path)
    assert _snapshot_dir(tmp_path) == before


def test_successful_save_leaves_only_its_files_and_cleans_leftovers(tmp_path):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    # What a crashed save may leave: a temporary, a renamed but uncommitted shard.
    (tmp_path / ".llmopt-tmp-0123456789ab-shard-00001.safetensors").write_bytes(b"partial")
    (tmp_path / "model-deadbeef-00001-of-00002.safetensors").write_bytes(b"uncommitted")
    (tmp_path / "notes.txt").write_text("the user's own file")
    llmopt.save(_small(1), tmp_path, max_shard_bytes=2000)
    assert _listing(tmp_path) == sorted(_referenced(tmp_path) + ["llmopt.json", "notes.txt"])
    llmopt.save(_small(1), tmp_path)
    assert _listing(tmp_path) == sorted(_referenced(tmp_path) + ["llmopt.json", "notes.txt"])
    assert _same(llmopt.load(ToyMLP(), tmp_path), _state(_small(1)))


def test_new_files_never_overwrite_the_old_save(tmp_path):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    first = set(_referenced(tmp_path))
    llmopt.save(_small(1), tmp_path, max_shard_bytes=2000)
    second = set(_referenced(tmp_path))
    assert first.isdisjoint(second) and len(first) == len(second)
    llmopt.save(_small(2), tmp_path, max_shard_bytes=2000)
    assert set(_referenced(tmp_path)) == first  # the usual names are free again


# ------------------------------------------------------------------------- files bound to a manifest
def test_shard_of_another_save_with_the_same_name_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    llmopt.save(_small(0), a, max_shard_bytes=2000)
    llmopt.save(_small(1), b, max_shard_bytes=2000)
    names = _referenced(a)
    assert names == _referenced(b)
    shutil.copy(b / names[1], a / names[1])  # the old layout's silent mix
    skeleton = ToyMLP()
    before = _state(skeleton)
    with pytest.raises(LoadError, match=rf"{names[1]}.*(belongs to save|bytes where)"):
        llmopt.load(skeleton, a)
    assert _same(skeleton, before)


def test_same_size_file_of_another_save_is_refused_by_its_save_id(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    llmopt.save(_small(0), a)
    llmopt.save(_small(1), b)
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    assert (a / "model.safetensors").stat().st_size == json.loads((a / "llmopt.json").read_text())["tensor_bytes"]
    with pytest.raises(LoadError, match=r"model\.safetensors belongs to save [0-9a-f]+, not to the save"):
        llmopt.load(ToyMLP(), a)


# ------------------------------------------------------------------------------ all-or-nothing load
def _rewrite_tensors(directory, edit) -> None:
    """Change the tensors of a single-file save and keep it self-consistent (same save id, new size)."""
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=header)
    manifest = json.loads(open(os.path.join(directory, "llmopt.json")).read())
    manifest["tensor_bytes"] = os.path.getsize(path)
    with open(os.path.join(directory, "llmopt.json"), "w") as f:
        json.dump(manifest, f)


def _identity(model: nn.Module):
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    real = {n: t.clone() for n, t in tensors.items() if t.device.type != "meta"}
    return {n: m for n, m in model.named_modules()}, tensors, real


def _unchanged(model: nn.Module, identity) -> bool:
    """The same module objects, the same tensor objects under the same names, with the same values."""
    modules, tensors, real = identity
    now = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    return (dict(model.named_modules()).keys() == modules.keys()
            and all(m is modules[n] for n, m in model.named_modules())
            and now.keys() == tensors.keys() and all(t is tensors[n] for n, t in now.items())
            and all(torch.equal(now[n], v) for n, v in real.items()))


@pytest.mark.parametrize("skeleton_device", ["cpu", "meta"])
def test_corrupt_last_shard_leaves_skeleton_unchanged(tmp_path, skeleton_device):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    last = os.path.join(tmp_path, _referenced(tmp_path)[-1])
    data = bytearray(open(last, "rb").read())
    data[8:40] = b"{" * 32  # header garbage, same size
    open(last, "wb").write(bytes(data))
    with torch.device(skeleton_device):
        skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(LoadError, match=rf"{os.path.basename(last)}: not a readable safetensors file"):
        llmopt.load(skeleton, tmp_path)
    assert _unchanged(skeleton, identity)


def test_missing_key_in_last_shard_leaves_skeleton_unchanged(tmp_path):
    llmopt.save(_small(0), tmp_path)
    _rewrite_tensors(tmp_path, lambda t: t.pop("down.bias"))
    skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(LoadError, match=r"missing keys \['down.bias'\]"):
        llmopt.load(skeleton, tmp_path)
    assert _unchanged(skeleton, identity)
    llmopt.load(skeleton, tmp_path, strict=False)  # non-strict: loads what is there
    assert torch.equal(skeleton.down.weight, _small(0).down.weight)


def test_wrong_shape_names_file_and_leaves_skeleton_unchanged(tmp_path):
    llmopt.save(_small(0), tmp_path)
    _rewrite_tensors(tmp_path, lambda t: t.update({"down.weight": t["down.weight"][:, :3].contiguous()}))
    skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(LoadError, match=r"model\.safetensors: tensor 'down.weight' has shape"):
        llmopt.load(skeleton, tmp_path)
    assert _unchanged(skeleton, identity)


def test_failure_after_assignment_restores_every_tensor(tmp_path, monkeypatch):
    """Even a failure once tensors were assigned (here: the final meta-device check) undoes the load."""
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    save_module = sys.modules["llmopt.io.save"]

    def failing(model):
        raise RuntimeError("injected failure after every shard was assigned")

    monkeypatch.setattr(save_module, "_check_materialized", failing)
    skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(RuntimeError, match="injected"):
        llmopt.load(skeleton, tmp_path)
    assert _unchanged(skeleton, identity)


# ------------------------------------------------------------------------------------- confinement
def _set_tensors(directory, value) -> None:
    manifest = json.loads((directory / "llmopt.json").read_text())
    manifest["tensors"] = value
    manifest.pop("tensor_bytes", None)
    (directory / "llmopt.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/passwd", "ABS", "../outside.safetensors", "../../x.safetensors",
                                  "sub/model.safetensors", "..", ".", ""])
def test_manifest_cannot_name_files_outside_the_directory(tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    save_file({"up.weight": torch.zeros(1)}, str(outside))
    saved = tmp_path / "save"
    llmopt.save(_small(0), saved)
    (saved / "sub").mkdir()
    shutil.copy(saved / "model.safetensors", saved / "sub" / "model.safetensors")
    _set_tensors(saved, str(outside) if name == "ABS" else name)
    skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(LoadError, match="not a plain file name inside the directory|non-empty string"):
        llmopt.load(skeleton, saved)
    assert _unchanged(skeleton, identity)


def test_symlink_leaving_the_directory_is_refused(tmp_path):
    saved = tmp_path / "save"
    llmopt.save(_small(0), saved)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(saved / "model.safetensors", outside)
    os.symlink(outside, saved / "model.safetensors")
    with pytest.raises(LoadError, match=r"'model.safetensors' is a link to .*elsewhere.safetensors, outside"):
        llmopt.load(ToyMLP(), saved)
    # A manifest that is itself a link out of the directory is refused too.
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(saved / "llmopt.json", other / "llmopt.json")
    with pytest.raises(LoadError, match="outside the directory"):
        llmopt.io.read_manifest(other)


def test_symlink_inside_the_directory_is_allowed(tmp_path):
    llmopt.save(_small(0), tmp_path)
    os.rename(tmp_path / "model.safetensors", tmp_path / "real.safetensors")
    os.symlink("real.safetensors", tmp_path / "model.safetensors")
    assert _same(llmopt.load(ToyMLP(), tmp_path), _state(_small(0)))


# -------------------------------------------------------------------------- load errors name files
MANIFEST_CASES = {
    "not JSON": (b"{not json", r"llmopt\.json is not valid JSON"),
    "empty": (b"", r"llmopt\.json is empty"),
    "binary": (b"\xff\xfe\x00garbage", r"llmopt\.json: not a JSON file"),
    "a JSON list": (b"[1, 2]", r"llmopt\.json: expected a JSON object, got list"),
    "no modules": (b'{"format_version": 1, "tensors": "model.safetensors"}', r"llmopt\.json: has no 'modules'"),
    "string version": (b'{"format_version": "2", "modules": {}}', r"llmopt\.json: format_version must be a positive"),
    "future version": (b'{"format_version": 99, "modules": {}}', r"llmopt\.json has format_version 99.*upgrade"),
    "bad module": (b'{"modules": {"up": "QuantLinear"}}', r"llmopt\.json: module 'up' must be an object"),
    "bad tensors": (b'{"modules": {}, "tensors": 3}', r"llmopt\.json: 'tensors' must be a file name"),
    "bad aliases": (b'{"modules": {}, "aliases": [1]}', r"llmopt\.json: 'aliases' must map"),
    "bad resized": (b'{"modules": {}, "resized": {"linears": {"up": [1]}}}', r"llmopt\.json: resized linear 'up'"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_errors_name_the_file(tmp_path, case):
    llmopt.save(_small(0), tmp_path)
    content, pattern = MANIFEST_CASES[case]
    (tmp_path / "llmopt.json").write_bytes(content)
    skeleton = ToyMLP()
    identity = _identity(skeleton)
    with pytest.raises(LoadError, match=pattern) as info:
        llmopt.load(skeleton, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert _unchanged(skeleton, identity)


def test_unknown_module_type_and_bad_config_name_the_file(tmp_path):
    llmopt.save(_small(0), tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    manifest["modules"]["up"]["config"] = {"nonsense": 1}
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match=r"llmopt\.json: module 'up' \(QuantLinear\) has an invalid config"):
        llmopt.load(ToyMLP(), tmp_path)
    manifest["modules"]["up"]["type"] = "NoSuchLinear"
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match=r"llmopt\.json: module 'up' has unknown type 'NoSuchLinear'"):
        llmopt.load(ToyMLP(), tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "a directory"])
def test_damaged_tensor_file_is_named(tmp_path, damage):
    llmopt.save(_small(0), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    if damage == "a directory":
        path.unlink()
        path.mkdir()
        pattern = r"'model.safetensors' is not a regular file"
    else:
        path.write_bytes({"truncated": data[: len(data) // 2], "random bytes": os.urandom(len(data)),
                          "empty": b""}[damage])
        pattern = r"model\.safetensors: (\d+ bytes where .* recorded|not a readable safetensors file)"
    with pytest.raises(LoadError, match=pattern):
        llmopt.load(ToyMLP(), tmp_path)
    # Without the recorded size (a save from before it was recorded) safetensors' own check names the file.
    if damage != "a directory":
        manifest = json.loads((tmp_path / "llmopt.json").read_text())
        manifest.pop("tensor_bytes")
        (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
        with pytest.raises(LoadError, match=r"model\.safetensors: not a readable safetensors file"):
            llmopt.load(ToyMLP(), tmp_path)


def test_missing_tensor_file_is_named(tmp_path):
    llmopt.save(_small(0), tmp_path, max_shard_bytes=2000)
    gone = _referenced(tmp_path)[1]
    os.remove(tmp_path / gone)
    with pytest.raises(FileNotFoundError, match=rf"{gone} is missing"):
        llmopt.load(ToyMLP(), tmp_path)


# ---------------------------------------------------------------------------------------- adapters
def _with_lora(seed: int) -> ToyMLP:
    model = _small(seed)
    llmopt.compress_(model, llmopt.LoRA(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def test_adapters_failed_save_keeps_old_and_names_bad_metadata(tmp_path):
    llmopt.save_adapters(_with_lora(0), tmp_path)
    before = _snapshot_dir(tmp_path)
    with pytest.raises(TypeError, match=r"metadata\['x'\] is not JSON-serialisable"):
        llmopt.save_adapters(_with_lora(1), tmp_path, metadata={"x": {1, 2}})
    assert _snapshot_dir(tmp_path) == before
    llmopt.save_adapters(_with_lora(1), tmp_path)  # over an existing save: a new name, old one removed
    assert _listing(tmp_path) == sorted(["adapters.json", json.loads((tmp_path / "adapters.json").read_text())["tensors"]])


def test_adapters_load_is_confined_and_names_files(tmp_path):
    llmopt.save_adapters(_with_lora(0), tmp_path)
    manifest = json.loads((tmp_path / "adapters.json").read_text())
    manifest["tensors"] = "../adapters.safetensors"
    (tmp_path / "adapters.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="not a plain file name inside the directory"):
        llmopt.load_adapters(_small(0), tmp_path)
    (tmp_path / "adapters.json").write_text("[")
    with pytest.raises(LoadError, match=r"adapters\.json is not valid JSON"):
        llmopt.load_adapters(_small(0), tmp_path)


def test_recipe_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    recipe = llmopt.Recipe([llmopt.Stage(llmopt.RTN("int4", 32))])
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    before = path.read_bytes()
    import llmopt.pipeline.recipe as recipe_module

    def failing(data):
        raise RuntimeError("injected failure while serialising")

    monkeypatch.setattr(recipe_module, "_yaml_dump", failing)
    with pytest.raises(RuntimeError, match="injected"):
        llmopt.Recipe([llmopt.Stage(llmopt.RTN("int8", None))]).save(path)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["recipe.yaml"]
