"""The Hugging Face Hub in and out, against a fake Hub on localhost (tests/publish/fake_hub.py): IN as a repo id
fetches only the files a command uses, at --revision, from the cache when offline; the record names the
repo and commit; a push uploads OUT byte for byte once it verifies, and nothing when it does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub, oid
from helpers import assert_clean_failure, file_bytes

import dern_stream
from dern_stream.cli import main
from dern_stream.errors import DernError
from dern_stream.publish.card import base_card_of
from dern_stream.publish.verify import verify

REPO = "org/tiny-moe"
# What a model repo holds beside the checkpoint: side files the output copies, and what no command reads.
SIDE_FILES = {"README.md": b"---\nlicense: apache-2.0\n---\n# tiny MoE\n", "chat_template.jinja": b"{{ messages }}\n",
              "LICENSE": b"Apache License 2.0\n"}
NOT_NEEDED = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
              "pytorch_model.bin": b"\x80\x02pickle" * 100, "original/consolidated.00.pth": b"\x00" * 5000,
              "original/params.json": b"{}\n", "consolidated.safetensors": b"\x00" * 5000}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(build):
    """A sharded tiny Mixtral (index + shards), as transformers saved it."""
    return build("mixtral", max_shard_size="100KB").model_dir


@pytest.fixture
def hub(model, tmp_path, monkeypatch):
    """The fake Hub serving REPO (the model, side files and files no command reads), with huggingface_hub
    pointed at it (as HF_ENDPOINT does), its cache in tmp_path/hf (as HF_HOME=tmp_path/hf does), Xet off
    (the fake speaks plain HTTP and LFS) and a token."""
    from huggingface_hub import constants

    with FakeHub() as fake:
        fake.add(REPO, {**file_bytes(model), **SIDE_FILES, **NOT_NEEDED})
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        yield fake


def needed(model: Path) -> set[str]:
    return set(file_bytes(model)) | set(SIDE_FILES)


def test_rewrite_by_repo_id_fetches_only_what_it_uses(hub, model, tmp_path):
    out = tmp_path / "out"
    result = run("rewrite", REPO, out, "-k", "4", "--importance", "router-norm", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(hub.downloaded()) == sorted(needed(model))  # each once; nothing of NOT_NEEDED
    assert verify(out, against=model, progress=False).ok  # the input read is the model, byte for byte
    for name, data in SIDE_FILES.items():
        if name == "README.md":  # the output's README is its model card, with the input's card inside
            assert base_card_of((out / name).read_text()) == data.decode()
        else:
            assert (out / name).read_bytes() == data
    text = (out / "dern_stream.json").read_text()
    source = json.loads(text)["source"]
    assert {k: source[k] for k in ("repo_id", "revision", "commit")} == \
        {"repo_id": REPO, "revision": "main", "commit": hub.repos[REPO].refs["main"]}
    assert "path" not in source and str(tmp_path) not in text  # no path of this machine in the record


def test_a_local_input_is_recorded_by_its_name(model, tmp_path):
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, importance="router-norm", progress=False)
    text = (out / "dern_stream.json").read_text()
    assert {k: v for k, v in json.loads(text)["source"].items() if k in ("name", "path", "repo_id")} == \
        {"name": model.name}
    assert str(model.parent) not in text


def test_revision_selects_the_branch(hub, model, tmp_path):
    v2 = hub.add(REPO, {**hub.files(REPO), "README.md": b"# tiny MoE, v2\n"}, branch="v2")
    out = tmp_path / "out"
    dern_stream.rewrite(REPO, out, experts=4, importance="router-norm", revision="v2", progress=False)
    assert base_card_of((out / "README.md").read_text()) == "# tiny MoE, v2\n"
    source = json.loads((out / "dern_stream.json").read_text())["source"]
    assert (source["revision"], source["commit"]) == ("v2", v2)
    resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolved and all(f"/resolve/{v2}/" in p for p in resolved)
    result = run("plan", REPO, "-k", "4", "--revision", v2[:12] + "x" * 28, "-q")  # no such commit
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output


def test_a_second_run_offline_uses_the_cache(hub, model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    first, second = tmp_path / "first", tmp_path / "second"
    assert run("rewrite", REPO, first, "-k", "4", "--importance", "router-norm", "-q").exit_code == 0
    asked = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    result = run("rewrite", REPO, second, "-k", "4", "--importance", "router-norm", "-q")
    assert result.exit_code == 0, result.output
    assert len(hub.requests) == asked  # nothing asked of the Hub
    assert file_bytes(second) == file_bytes(first)


@pytest.mark.slow
def test_hf_home_and_hf_hub_offline_from_the_environment(hub, model, tmp_path):
    """The environment variables themselves, in a fresh process: HF_HOME finds the cache the first run
    filled, HF_HUB_OFFLINE=1 sends nothing to HF_ENDPOINT, and the output is the same bytes."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("rewrite", REPO, first, "-k", "4", "--importance", "router-norm", "-q").exit_code == 0
    asked = len(hub.requests)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.url,
               PYTHONPATH=os.pathsep.join([str(Path(dern_stream.__file__).parents[1]), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "dern_stream.cli", "rewrite", REPO, str(second), "-k", "4",
                           "--importance", "router-norm", "-q"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(hub.requests) == asked
    assert file_bytes(second) == file_bytes(first)


@pytest.mark.parametrize("args, message", [
    (["org/missing"], "Hugging Face repo org/missing was not found on the Hub"),
    ([REPO, "--revision", "nope"], f"Hugging Face repo {REPO} (revision nope) was not found: the repo has no such"),
    (["OFFLINE", REPO], f"Hugging Face repo {REPO} (revision main) is not (completely) in the local cache"),
    (["LOCAL", "--revision", "v2"], "--revision v2 is for a Hugging Face repo id; "),
    ([REPO, "--push-to-hub", "no id"], "--push-to-hub needs a Hugging Face repo id such as me/Mixtral-4x, got 'no id'"),
    ([REPO, "--private"], "--private goes with --push-to-hub"),
    (["NO_TOKEN", REPO, "--push-to-hub", "me/x"], "pushing to Hugging Face repo me/x needs a token"),
])
def test_hub_failures_are_one_line(args, message, hub, model, tmp_path, monkeypatch):
    if args[0] == "OFFLINE":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        args = args[1:]
    if args[0] == "NO_TOKEN":  # checked before the rewrite, not hours later at the push
        monkeypatch.delenv("HF_TOKEN")
        args = args[1:]
    args = [model if a == "LOCAL" else a for a in args]
    out = tmp_path / "out"
    result = run("rewrite", args[0], out, "-k", "4", "--importance", "router-norm", "-q", *args[1:])
    assert_clean_failure(result, out, message)
    assert not (tmp_path / "hf" / "hub" / "models--org--tiny-moe" / "snapshots").exists()  # nothing fetched


def test_an_interrupted_download_resumes(hub, model, tmp_path, monkeypatch):
    """The connection breaks half way through a shard: huggingface_hub keeps what it received (in
    4 KiB pieces here, 10 MB by default) and asks for the rest only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    shard = sorted(n for n in file_bytes(model) if n.endswith(".safetensors"))[1]
    hub.cut_once.add(shard)
    made = dern_stream.plan(REPO, experts=4, progress=False)
    ranges = [r.headers.get("Range") for r in hub.requests if r.method == "GET" and r.path.endswith(shard)]
    size = len(file_bytes(model)[shard])
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] == f"bytes={size // 2 // 4096 * 4096}-"
    assert (made.source / shard).read_bytes() == file_bytes(model)[shard]


def test_push_uploads_every_file_of_out(hub, model, tmp_path):
    out = tmp_path / "out"
    result = run("rewrite", REPO, out, "-k", "4", "--importance", "router-norm", "-q",
                 "--push-to-hub", "me/tiny-4x", "--private")
    assert result.exit_code == 0, result.output
    pushed = hub.repos["me/tiny-4x"]
    assert pushed.private
    assert hub.files("me/tiny-4x") == file_bytes(out)
    assert f"verified and pushed: {hub.url}/me/tiny-4x/commit/{pushed.refs['main']}" in result.stdout
    writes = [r for r in hub.requests if r.method == "POST" and "validate-yaml" not in r.path]
    assert writes and all(r.headers.get("Authorization") == "Bearer hf_test" for r in writes)  # the token
    assert {r.path for r in hub.requests if r.method == "PUT"} == {f"/lfs/{oid('x.safetensors', data)}" for
                                                                   name, data in file_bytes(out).items()
                                                                   if name.endswith(".safetensors")}  # via LFS
    # The standalone command, into a branch of a new repo
    result = run("push", out, "me/tiny-4x-b", "--revision", "exp", "-q")
    assert result.exit_code == 0, result.output
    assert hub.files("me/tiny-4x-b", "exp") == file_bytes(out)


def test_nothing_is_pushed_when_verify_fails(hub, model, tmp_path):
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, importance="router-norm", progress=False)
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    shard.write_bytes(bytes(data))
    before = len(hub.requests)
    with pytest.raises(DernError, match=r"^not pushed to me/broken: verify found a problem in .*: .*checksum "
                                        r"mismatch.*; nothing was uploaded$"):
        dern_stream.push(out, "me/broken", progress=False)
    result = run("push", model, "me/broken")  # not a rewrite's output
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "not pushed to me/broken: " in result.stderr and "dern_stream.json" in result.stderr
    assert len(hub.requests) == before and "me/broken" not in hub.repos


def test_a_push_beside_other_weights_is_refused(hub, model, tmp_path):
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, importance="router-norm", progress=False)
    main_before = hub.repos[REPO].refs["main"]
    result = run("push", out, REPO, "-q")  # REPO holds the input's shards, which OUT does not have
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"not pushed: Hugging Face repo {REPO} already holds weights that out does not" in result.stderr
    assert hub.repos[REPO].refs["main"] == main_before and not hub.lfs


@pytest.mark.parametrize("case, message", [
    ("read-only", "pushing to Hugging Face repo me/tiny-4x needs a token that may write; this one is read-only"),
    ("other namespace", "pushing to Hugging Face repo them/tiny-4x: the token is me's, which may write to me, org, "
                        "not to them"),
    ("weights there", f"not pushed: Hugging Face repo {REPO} already holds weights that out does not"),
])
def test_rewrite_push_to_hub_checks_the_token_and_the_repo_before_any_work(case, message, hub, model, tmp_path):
    """What the Hub can tell before the rewrite (the token's rights, weights already in the repo) refuses it before
    any layer is written, not after the work."""
    hub.token_role = "read" if case == "read-only" else "write"
    repo = {"read-only": "me/tiny-4x", "other namespace": "them/tiny-4x", "weights there": REPO}[case]
    result = run("rewrite", REPO, tmp_path / "out", "-k", "4", "--importance", "router-norm", "-q",
                 "--push-to-hub", repo)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr
    assert not list(tmp_path.glob("*out*"))  # no output, no staging folder: nothing was written
    assert not hub.lfs and not [r for r in hub.requests if r.method == "POST" and "commit" in r.path]
