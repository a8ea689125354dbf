"""Safety checker and prompt expansion on tiny random-weight transformers models built and saved here.

The classifier is a tiny ViT whose head bias is set so its "nsfw" label always (or never) wins: a controlled
checker that proves both policy paths. The language model is a tiny Qwen2 with a word-level tokenizer built
with `tokenizers` and a chat template. Both are saved with `save_pretrained` and loaded through the same
`from_pretrained` path as real weights. The live part runs one TLS server (tiny model) for all three dialects.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.media_helpers import read_video
from vace_local.core.errors import VaceError
from vace_local.core.media import probe_video, write_video
from vace_local.core.spec import JobSpec
from vace_local.engine.memory import GIB, Footprint, choose_policy
from vace_local.engine.prompt_expand import ExpanderOptions, expand_prompt
from vace_local.engine.safety_check import NOT_INSTALLED, SafetyOptions, flagged_label_ids, sample_indices
from vace_local.run.job import run_job

SMALL = dict(model="tiny", width=64, height=48, num_frames=17, num_inference_steps=1, seed=3)
ABSENT = "vace-test/absent-model"
_WORDS = ("a the fox cat walks runs slowly camera pans tracks close wide shot light warm cold forest street "
          "night day sky river moves turns smiles red blue green golden soft dramatic").split()


def build_classifier(dest: Path, flag_everything: bool) -> Path:
    """A tiny ViT classifier (labels normal / nsfw) whose head always picks nsfw, or never does."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 20.0] if flag_everything else [20.0, 0.0]))
    model.save_pretrained(dest)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dest)
    return dest


def build_language_model(dest: Path) -> Path:
    """A tiny Qwen2 causal LM with a word-level tokenizer and a chat template (random weights)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(_WORDS), "system", "user", "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = template
    fast.save_pretrained(dest)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # special tokens never win, so the expansion is made of words
        model.lm_head.weight[: len(specials)] = 0.0
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def aux_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("aux")
    return {"flag_all": build_classifier(d / "flag-all", True), "flag_none": build_classifier(d / "flag-none", False),
            "lm": build_language_model(d / "lm")}


# ---- units -----------------------------------------------------------------------------------------------

def test_flagged_label_comes_from_id2label_or_configuration():
    assert flagged_label_ids({0: "normal", 1: "nsfw"}, ()) == [1]
    five = {"0": "drawings", "1": "hentai", "2": "neutral", "3": "porn", "4": "sexy"}  # string keys, as in JSON
    assert flagged_label_ids(five, ()) == [1, 3, 4]
    assert flagged_label_ids({0: "ok", 1: "bad"}, ("bad",)) == [1]
    with pytest.raises(VaceError, match="VACE_SAFETY_FLAGGED_LABELS"):
        flagged_label_ids({0: "ok", 1: "bad"}, ())
    with pytest.raises(VaceError, match="not in the model's labels"):
        flagged_label_ids({0: "ok", 1: "bad"}, ("nsfw",))
    assert sample_indices(17, 8)[0] == 0 and sample_indices(17, 8)[-1] == 16 and len(sample_indices(3, 8)) == 3


def test_auto_policy_leaves_room_for_helper_models():
    fp = Footprint(transformer=4 * GIB, text_encoder=2 * GIB, vae=GIB)
    free = fp.total + GIB
    assert choose_policy(free, fp, reserve=GIB) == "none"
    with_aux = Footprint(transformer=4 * GIB, text_encoder=2 * GIB, vae=GIB, aux=GIB)
    assert choose_policy(free, with_aux, reserve=GIB) == "model"


# ---- the run path on tiny weights ------------------------------------------------------------------------

def test_report_only_flags_but_keeps_the_video(tmp_path: Path, aux_models):
    spec = JobSpec(**SMALL, prompt="a cat", enable_safety_checker=True)
    res = run_job(spec, tmp_path / "all", safety=SafetyOptions(model=str(aux_models["flag_all"])))
    assert res.safety["status"] == "checked" and res.safety["flagged"] is True
    assert res.safety["action"] == "none" and res.safety["frames_checked"] == 8
    assert read_video(res.video_path).frames.max() > 40  # the generated noise, untouched
    meta = json.loads(res.metadata_path.read_text())
    assert meta["safety_checker"]["flagged"] is True


def test_replace_policy_writes_a_black_video_of_the_same_shape(tmp_path: Path, aux_models):
    spec = JobSpec(**SMALL, prompt="a cat", enable_safety_checker=True)
    opts = SafetyOptions(model=str(aux_models["flag_all"]), policy="replace")
    res = run_job(spec, tmp_path, safety=opts)
    assert res.safety["action"] == "replaced_with_black" and "black video" in res.notes[0]
    frames = read_video(res.video_path).frames
    assert probe_video(res.video_path) == (17, 16.0, 64, 48)
    assert frames.shape == (17, 48, 64, 3) and frames.max() <= 2
    meta = json.loads(res.metadata_path.read_text())
    assert meta["safety_checker"]["action"] == "replaced_with_black"
    # the checker that flags nothing: a clean output is left alone under the same policy
    ok = run_job(spec, tmp_path / "ok", safety=SafetyOptions(model=str(aux_models["flag_none"]), policy="replace"))
    assert ok.safety["status"] == "checked" and ok.safety["flagged"] is False and ok.safety["action"] == "none"
    assert read_video(ok.video_path).frames.max() > 40


def test_input_images_are_checked_when_configured(tmp_path: Path, aux_models, fixtures_dir: Path):
    ref = str(fixtures_dir / "vace" / "girl.png")
    spec = JobSpec(**SMALL, prompt="a girl", enable_safety_checker=True, inputs={"reference_images": [ref]})
    res = run_job(spec, tmp_path, safety=SafetyOptions(model=str(aux_models["flag_all"]), check_inputs=True))
    assert res.safety["inputs"] == [{"field": "reference_images[0]", "score": 1.0, "flagged": True}]


def test_missing_checker_says_so_and_claims_nothing(tmp_path: Path):
    spec = JobSpec(**SMALL, prompt="a cat", enable_safety_checker=True)
    res = run_job(spec, tmp_path, safety=SafetyOptions(model=ABSENT, policy="replace"))
    assert res.safety["status"] == "not_installed" and res.safety["flagged"] is None
    assert NOT_INSTALLED in res.notes[0] and "vace-local download safety" in res.notes[0]
    meta = json.loads(res.metadata_path.read_text())
    assert NOT_INSTALLED in meta["safety_checker"]["message"]
    assert read_video(res.video_path).frames.max() > 40  # nothing checked → nothing replaced


def test_expansion_changes_what_the_text_encoder_sees(tmp_path: Path, aux_models):
    from vace_local.engine.engine import get_engine

    original = "a red fox walks slowly"
    opts = ExpanderOptions(model=str(aux_models["lm"]), max_new_tokens=24)
    spec = JobSpec(**SMALL, prompt=original, enable_prompt_expansion=True)
    res = run_job(spec, tmp_path / "a", expander=opts)
    expanded = res.prompt
    assert res.prompt_expansion["status"] == "expanded" and expanded and expanded != original
    assert res.prompt_expansion["original_prompt"] == original
    cache = list(get_engine("tiny")._text_cache)
    assert expanded in cache and original not in cache  # the embedding cache keys on the expanded prompt
    meta = json.loads(res.metadata_path.read_text())
    assert meta["prompt_used"] == expanded and meta["spec"]["prompt"] == original
    again = run_job(spec.model_copy(update={"seed": 4}), tmp_path / "b", expander=opts)
    assert again.prompt == expanded  # greedy decoding: deterministic
    missing = run_job(spec, tmp_path / "c", expander=ExpanderOptions(model=ABSENT))
    assert missing.prompt == original and missing.prompt_expansion["status"] == "not_installed"
    assert "prompt expander not installed" in missing.notes[0]


def _generate_with_helpers(out: Path) -> tuple[str, dict]:
    """`vace-local generate --model tiny --safety-check --expand-prompt`; returns its output and metadata."""
    from typer.testing import CliRunner

    from vace_local.cli import app

    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--num-frames", "17", "--steps",
            "1", "--seed", "2", "--out", str(out), "--name", "c", "--safety-check", "--expand-prompt", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output, json.loads((out / "c.json").read_text())


def test_cli_flags_use_the_configured_models(tmp_path: Path, aux_models, monkeypatch):
    monkeypatch.setenv("VACE_SAFETY_MODEL", str(aux_models["flag_all"]))
    monkeypatch.setenv("VACE_PROMPT_EXPANDER_MODEL", ABSENT)
    output, meta = _generate_with_helpers(tmp_path)
    assert "output flagged" in output and "prompt expander not installed" in output
    assert meta["safety_checker"]["flagged"] is True and meta["prompt_expansion"]["status"] == "not_installed"


def test_tiny_helpers_are_controlled_and_load_like_real_weights(fixtures_dir: Path):
    """`tiny` names the tiny expander and classifier: built here (real Qwen2 / ResNet classes, tiny configs),
    loaded through the same `from_pretrained` code as downloaded weights, with known answers."""
    from PIL import Image

    from vace_local.engine.models import resolve_aux_model
    from vace_local.engine.safety_check import get_checker
    from vace_local.engine.tiny import TINY_EXPANSION, TINY_HELPER, TINY_SAFETY_MARKER

    lm = resolve_aux_model(TINY_HELPER, "prompt-expander")
    assert json.loads((lm / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    for prompt in ("a red fox walks slowly", "日本語のプロンプト", "x"):
        report = expand_prompt(prompt, ExpanderOptions(model=TINY_HELPER))
        assert report.status == "expanded" and report.prompt == TINY_EXPANSION, report
        assert report.as_dict()["tiny"] is True and "TINY smoke-test expander" in report.message
    checker = get_checker(SafetyOptions(model=TINY_HELPER))
    assert type(checker.model).__name__ == "ResNetForImageClassification"
    rng = np.random.default_rng(0)
    marker = np.full((48, 64, 3), TINY_SAFETY_MARKER, np.uint8)
    mostly = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mostly[:, :40] = TINY_SAFETY_MARKER
    others = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(8)]
    others += [np.full((48, 64, 3), v, np.uint8) for v in ((0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 0, 0))]
    others.append(np.array(Image.open(fixtures_dir / "vace" / "girl.png").convert("RGB")))
    scores = checker.scores([marker, mostly, *others])
    assert min(scores[:2]) > 0.99 and max(scores[2:]) < 0.01, scores


def test_tiny_model_runs_its_tiny_helpers_from_the_cli(tmp_path: Path, monkeypatch):
    """With the default helper ids, `--model tiny` expands and checks with the tiny helpers and says so."""
    from vace_local.engine.tiny import TINY_EXPANSION

    monkeypatch.delenv("VACE_SAFETY_MODEL", raising=False)
    monkeypatch.delenv("VACE_PROMPT_EXPANDER_MODEL", raising=False)
    output, meta = _generate_with_helpers(tmp_path)
    assert "TINY smoke-test classifier" in output and "TINY smoke-test expander" in output
    assert meta["prompt_used"] == TINY_EXPANSION and meta["spec"]["prompt"] == "a cat"
    assert meta["prompt_expansion"]["tiny"] is True and meta["prompt_expansion"]["model"] == "tiny"
    assert meta["safety_checker"]["tiny"] is True and meta["safety_checker"]["flagged"] is False
    assert meta["safety_checker"]["frames_checked"] == 8


@pytest.mark.gpu
def test_expander_leaves_the_gpu_after_use_unless_kept(aux_models):
    from vace_local.engine.prompt_expand import get_expander

    for keep in (False, True):
        opts = ExpanderOptions(model=str(aux_models["lm"]), max_new_tokens=8, device="cuda", keep_on_gpu=keep)
        assert expand_prompt("a fox", opts).status == "expanded"
        device = next(get_expander(opts).model.parameters()).device.type
        assert device == ("cuda" if keep else "cpu")


# ---- live: the "not installed" path through WaveSpeed, fal and AI/ML ---------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory, aux_models):
    from tests.test_fal_live import _make_cert, _start, _stop, _wait_ready

    tmp = tmp_path_factory.mktemp("aux-live")
    cert, key = _make_cert(tmp)
    env = {"VACE_SAFETY_MODEL": ABSENT, "VACE_PROMPT_EXPANDER_MODEL": str(aux_models["lm"]),
           "VACE_PROMPT_EXPANDER_MAX_NEW_TOKENS": "24", "VACE_ALLOWED_HOSTS": "127.0.0.1"}
    proc, port, log = _start(tmp, cert, key, "--model", "tiny", "--workers", "1", env_extra=env)
    try:
        _wait_ready(f"https://127.0.0.1:{port}", cert, proc)
        yield {"port": port, "cert": cert, "base": f"https://127.0.0.1:{port}", "tmp": tmp}
    finally:
        _stop(proc, log)


@pytest.mark.slow
def test_not_installed_is_honest_in_every_dialect(live, aux_models, monkeypatch):
    import wavespeed

    from tests.test_fal_live import KEY, _ctx, _fal

    expected = expand_prompt("a fox runs", ExpanderOptions(model=str(aux_models["lm"]), max_new_tokens=24)).prompt
    # WaveSpeed through its official SDK: enable_safety_checker defaults to true
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(live["cert"]))
    client = wavespeed.Client(api_key=KEY, base_url=live["base"])
    out = client.run("wavespeed-ai/wan-2.1-14b-vace", {"prompt": "a fox runs", "num_inference_steps": 2, "seed": 1},
                     timeout=240, poll_interval=0.2)
    data = client.get_result(_job_id_of(out["outputs"][0]))["data"]
    assert data["status"] == "completed" and data["has_nsfw_contents"] == [None]
    assert NOT_INSTALLED in data["safety_checker"]

    # fal through fal-client (with logs): the expanded prompt is fal's `prompt`
    res = _fal(live, """
        logs = []
        r = fal_client.subscribe("fal-ai/wan-vace-14b", arguments={"prompt": "a fox runs", "num_inference_steps": 2,
            "enable_safety_checker": True, "enable_prompt_expansion": True, "seed": 1}, with_logs=True,
            on_queue_update=lambda u: logs.extend(x["message"] for x in (getattr(u, "logs", None) or [])))
        r["_logs"] = logs
        print(json.dumps(r))
    """)
    assert res["has_nsfw_concepts"] == [None] and NOT_INSTALLED in res["safety_checker"]
    assert res["prompt"] == expected != "a fox runs"
    assert any(NOT_INSTALLED in m for m in res["_logs"]) and any("prompt expanded" in m for m in res["_logs"])

    # AI/ML: its polling flow with plain HTTP
    vid = write_video(np.full((17, 48, 64, 3), 90, np.uint8), live["tmp"] / "in.mp4", fps=16)
    uri = "data:video/mp4;base64," + base64.b64encode(vid.read_bytes()).decode()
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live["base"], verify=_ctx(live["cert"]), headers=h, timeout=30) as c:
        r = c.post("/v2/video/generations", json={
            "model": "alibaba/wan2.2-vace-fun-a14b-pose", "prompt": "a fox runs", "video_url": uri, "seed": 1,
            "num_inference_steps": 2, "enable_safety_checker": True, "enable_prompt_expansion": True})
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        for _ in range(600):
            body = c.get("/v2/video/generations", params={"generation_id": gid}).json()
            if body["status"] in ("completed", "error"):
                break
            time.sleep(0.3)
    assert body["status"] == "completed", body
    assert body["meta"]["has_nsfw_concepts"] == [None] and NOT_INSTALLED in body["meta"]["safety_checker"]
    assert body["meta"]["prompt"] == expected
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # nothing was fetched to make this pass


def _job_id_of(file_url: str) -> str:
    """The job id in an output URL: `/files/outputs/<id>[/<token>]/<name>` (a token when keys are set)."""
    parts = file_url.split("/")
    return parts[parts.index("outputs") + 1]
