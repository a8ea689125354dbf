"""Units that need no model: spec rules, model resolution, memory policy choice, inputs, packaging."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import ROOT
from vace_local.core.errors import InputError, ModelNotFoundError
from vace_local.core.inputs import decode_data_uri, fetch_inputs
from vace_local.core.spec import JobInputs, JobSpec
from vace_local.engine.memory import GIB, Footprint, choose_policy, wants_vae_tiling
from vace_local.engine.models import BUILTIN_MODELS, resolve_model
from vace_local.engine.tiny import build_tiny_pipeline, ensure_tiny_model


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"width": 840}, "width"),
        ({"height": 100}, "height"),
        ({"num_frames": 80}, "num_frames"),
        ({"num_frames": 13}, "num_frames"),
        ({"num_frames": 965}, "num_frames"),  # past VACE_MAX_FRAMES (961)
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"sampler": "ddim"}, "sampler"),
        ({"seed": 2**31}, "seed"),
        ({"guidance_scale": 25}, "guidance_scale"),
        ({"context_scale": [0.5, 2.5]}, "context_scale"),
        ({"task": "depth"}, "video"),
        ({"inputs": {"reference_images": ["a"] * 6}}, "reference_images"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_jobspec_rejects_with_field_name(kw: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec(**kw)
    assert field in str(err.value)


def test_jobspec_defaults_follow_official_vace() -> None:
    s = JobSpec()
    assert (s.width, s.height, s.num_frames, s.fps) == (832, 480, 81, 16)
    assert (s.flow_shift, s.guidance_scale, s.sampler, s.context_scale, s.seed) == (16.0, 5.0, "unipc", 1.0, -1)


def test_importing_the_spec_does_not_import_torch() -> None:
    code = "import sys, vace_local, vace_local.core.spec, vace_local.run.job; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# -- model resolution -------------------------------------------------------------------------------


def test_tiny_save_load_roundtrip_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import WanVACEPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, two in (("tiny", False), ("tiny-two-expert", True)):
        path = ensure_tiny_model(name, tmp_path)
        assert ensure_tiny_model(name, tmp_path) == path  # idempotent
        loaded = WanVACEPipeline.from_pretrained(path)
        built = build_tiny_pipeline(two_experts=two)
        for comp in ("transformer", "text_encoder", "vae") + (("transformer_2",) if two else ()):
            a, b = getattr(loaded, comp).state_dict(), getattr(built, comp).state_dict()
            assert a.keys() == b.keys()
            assert all((a[k] == b[k]).all() for k in a), comp
        assert loaded.config.boundary_ratio == (0.875 if two else None)
        assert loaded.tokenizer("a cat").input_ids == built.tokenizer("a cat").input_ids


def test_resolve_local_dir_and_errors(tmp_path: Path) -> None:
    tiny = ensure_tiny_model("tiny", tmp_path)
    local = resolve_model(str(tiny))
    assert local.kind == "local" and local.path == tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_model(str(empty))
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing"))


def test_builtin_models_offline_give_the_fetch_command() -> None:
    for name, info in BUILTIN_MODELS.items():
        with pytest.raises(ModelNotFoundError) as err:
            resolve_model(name)
        assert f"vace-local download {name}" in str(err.value) and info.repo_id in str(err.value)


# -- memory policy ----------------------------------------------------------------------------------

W14 = Footprint(transformer=int(32.3 * GIB), text_encoder=int(10.6 * GIB), vae=int(0.47 * GIB))
W13 = Footprint(transformer=int(4.0 * GIB), text_encoder=int(10.6 * GIB), vae=int(0.47 * GIB))
W22 = Footprint(transformer=int(32.3 * GIB), text_encoder=int(10.6 * GIB), vae=int(0.47 * GIB), experts=2)


@pytest.mark.parametrize(
    ("free_gib", "fp", "expected"),
    [
        (None, W14, "none"),  # CPU
        (79, W14, "none"),  # H100 80 GB: 14B + UMT5 resident
        (139, W22, "none"),  # H200: both experts resident
        (79, W22, "model"),  # two experts don't fit together on an H100
        (47, W14, "model"),  # L40S/A6000 48 GB
        (31, W14, "group"),  # 32 GB card
        (23, W14, "group"),  # 24 GB card
        (15, W13, "group"),  # 1.3B on 16 GB: offload groups
        (3, W14, "sequential"),
    ],
)
def test_choose_policy(free_gib: float | None, fp: Footprint, expected: str) -> None:
    free = None if free_gib is None else int(free_gib * GIB)
    assert choose_policy(free, fp) == expected


def test_vae_tiling_when_tight() -> None:
    assert not wants_vae_tiling("none", None)
    assert not wants_vae_tiling("none", 79 * GIB)
    assert wants_vae_tiling("model", 79 * GIB)
    assert wants_vae_tiling("none", 20 * GIB)


# -- inputs -----------------------------------------------------------------------------------------


def test_data_uri_and_local_inputs(tmp_path: Path, fixtures_dir: Path) -> None:
    png = (fixtures_dir / "vace" / "mask_test2.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    res = fetch_inputs(JobInputs(reference_images=[uri, str(fixtures_dir / "vace" / "girl.png")]), tmp_path)
    assert res.reference_images[0].read_bytes() == png and res.reference_images[0].suffix == ".png"
    assert res.reference_images[1] == fixtures_dir / "vace" / "girl.png"


@pytest.mark.parametrize("bad", ["data:image/png;base64,@@@", "data:nonsense", "data:image/png;base64,"])
def test_bad_data_uri_names_the_field(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError) as err:
        decode_data_uri(bad, tmp_path / "x", "first_image")
    assert err.value.field == "first_image"


def test_missing_file_input_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        fetch_inputs(JobInputs(reference_images=["/nope/a.png"]), tmp_path)
    assert err.value.field == "reference_images[0]"


# -- packaging --------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (dev extra)")
    out = subprocess.run([exe, str(ROOT / "Dockerfile.cuda")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_pyproject_keeps_torch_a_range() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch_req and ">=" in torch_req
    assert json.dumps(deps)  # sanity: parseable list


def test_download_offline_says_why() -> None:
    from vace_local.engine.models import download_model

    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        download_model("wan2.1-vace-1.3b")
