"""Model names and model folders: paths, URLs, links out, custom code and pickle weights are refused with 400
at create time (and by the estimate), nothing is stored, and no model code ever runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.config import Settings
from tests.conftest import TINY_GPT2_CONFIG
from tests.security.conftest import Stored, assert_refused, bearer

Upload = Callable[..., dict[str, object]]

HOSTILE_NAMES = [
    "../../etc", "..", ".", "../tiny-gpt2", "tiny-gpt2/../tiny-gpt2", "a/../../b", "/etc", "/etc/passwd",
    "/tmp", "//server/share", "C:\\Windows", "~root", "$HOME", "http://evil.example/model",
    "https://huggingface.co/gpt2", "file:///etc/passwd", "hf://gpt2", "a--b", "models--gpt2", "tiny-gpt2\x00",
    "tiny-gpt2\n", " tiny-gpt2", "-rf", "--model", "tiny-gpt2/", "tiny gpt2", "x" * 300, "",
    "org/name", "org/../name",
]


@pytest.fixture
def model_folder(models_dir: Path) -> Iterator[Callable[..., Path]]:
    """Make a model folder under the models directory for one test (removed afterwards)."""
    made: list[Path] = []

    def make(name: str, config: dict[str, object] | None = None, weights: str = "model.safetensors",
             extra: dict[str, str] | None = None) -> Path:
        folder = models_dir / name
        folder.mkdir()
        made.append(folder)
        (folder / "config.json").write_text(json.dumps(config or TINY_GPT2_CONFIG))
        (folder / weights).write_bytes(b"")
        for filename, text in (extra or {}).items():
            (folder / filename).write_text(text)
        return folder

    yield make
    for folder in made:
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()


def _create(client: TestClient, key: str, model: str, training_file: object):  # type: ignore[no-untyped-def]
    body = {"model": model, "training_file": training_file}
    return client.post("/v1/fine_tuning/jobs", headers=bearer(key), json=body)


def _estimate(client: TestClient, key: str, model: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/fine_tuning/estimate", headers=bearer(key), json={"model": model, "budget_bytes": 10**9})


def _listed(client: TestClient, key: str) -> set[str]:
    return {m["id"] for m in client.get("/v1/models", headers=bearer(key)).json()["data"]}


def test_paths_urls_and_odd_names_are_400_on_create_and_estimate(
    client: TestClient, key_a: str, upload: Upload, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    file_id = upload(key_a)["id"]
    before = snapshot()
    for name in HOSTILE_NAMES:
        assert_refused(_create(client, key_a, name, file_id), 400, "model")
        assert_refused(_estimate(client, key_a, name), 400, "model")
    unchanged(before)
    assert _create(client, key_a, "tiny-gpt2", file_id).status_code == 200  # the real name still works


def test_a_double_dash_name_is_refused_even_when_such_a_folder_exists(
    client: TestClient, key_a: str, upload: Upload, model_folder: Callable[..., Path],
    snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    model_folder("a--b")
    file_id = upload(key_a)["id"]
    before = snapshot()
    assert_refused(_create(client, key_a, "a--b", file_id), 400, "model")
    assert "a--b" not in _listed(client, key_a)
    unchanged(before)


def test_symlinks_out_of_the_models_folder_are_refused(
    client: TestClient, key_a: str, upload: Upload, models_dir: Path, tmp_path: Path,
    model_folder: Callable[..., Path], snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps(TINY_GPT2_CONFIG))
    (outside / "model.safetensors").write_bytes(b"")
    link = models_dir / "escape"
    link.symlink_to(outside, target_is_directory=True)
    # A folder inside, whose weights file is a link to a file outside (e.g. some other tenant's data).
    inner = model_folder("linked-weights")
    (inner / "model.safetensors").unlink()
    (inner / "model.safetensors").symlink_to(outside / "model.safetensors")
    file_id = upload(key_a)["id"]
    before = snapshot()
    try:
        for name in ("escape", "linked-weights"):
            assert_refused(_create(client, key_a, name, file_id), 400, "model")
            assert_refused(_estimate(client, key_a, name), 400, "model")
            assert name not in _listed(client, key_a)
    finally:
        link.unlink()
    unchanged(before)


def test_custom_code_and_pickle_only_models_are_refused_and_nothing_runs(
    client: TestClient, key_a: str, upload: Upload, model_folder: Callable[..., Path], tmp_path: Path,
    snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    marker = tmp_path / "code-ran"
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    remote = {**TINY_GPT2_CONFIG, "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                                      "AutoModelForCausalLM": "modeling_evil.Evil"}}
    model_folder("custom-code", config=remote, extra={"configuration_evil.py": payload, "modeling_evil.py": payload})
    model_folder("custom-tokenizer", extra={"tokenizer_config.json": json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})})
    model_folder("stray-code", extra={"modeling_gpt2.py": payload})
    model_folder("pickle-only", weights="pytorch_model.bin")
    model_folder("broken-config", extra={"config.json": "{not json"})
    file_id = upload(key_a)["id"]
    before = snapshot()
    for name in ("custom-code", "custom-tokenizer", "stray-code", "pickle-only", "broken-config"):
        assert_refused(_create(client, key_a, name, file_id), 400, "model")
        assert_refused(_estimate(client, key_a, name), 400, "model")
        assert name not in _listed(client, key_a)
    assert _listed(client, key_a) >= {"tiny-gpt2"}
    assert not marker.exists()
    unchanged(before)


def test_with_hub_models_allowed_only_org_name_ids_pass(
    settings: Settings, key_a: str, upload: Upload, snapshot: Callable[[], Stored],
) -> None:
    hub_app: FastAPI = create_app(settings.model_copy(update={"allow_hub_models": True}))
    with TestClient(hub_app, raise_server_exceptions=False) as hub:
        file_id = upload(key_a)["id"]
        before = snapshot()
        for name in ["org/../name", "../org/name", "org/name/extra", "https://huggingface.co/org/name", "org--x/name",
                     "/org/name", "org/name\x00", "org/.."]:
            assert_refused(_create(hub, key_a, name, file_id), 400, "model")
        assert snapshot().rows == before.rows
        assert _create(hub, key_a, "org/name", file_id).status_code == 200
