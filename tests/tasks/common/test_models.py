import pytest
import torch

from storage.errors import UserInputError
from tasks.common import models
from tasks.common.config import ModelConfig


def test_tiny_models_build_once_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXPLAIN_MODEL_CACHE", str(tmp_path))
    first = models.resolve(ModelConfig(name="tiny-llama", seed=3))
    second = models.resolve(ModelConfig(name="tiny-llama", seed=3))
    assert first.converted and not second.converted and first.source == second.source
    lm = models.load(ModelConfig(name="tiny-llama", seed=3, autocast="none"))
    assert (lm.n_layers, lm.d_model) == (4, 64)
    ids = lm.tokenizer("hello", return_tensors="pt").input_ids
    assert lm.tokenizer.decode(ids[0]) == "hello"
    assert torch.isfinite(lm.model(ids).logits).all()


def test_seed_changes_tiny_weights():
    a = models.load(ModelConfig(name="tiny-llama", seed=0)).model
    b = models.load(ModelConfig(name="tiny-llama", seed=1)).model
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_local_folder_loads_and_identity_names_it():
    tiny = models.resolve(ModelConfig(name="tiny-gemma3"))
    lm = models.load(ModelConfig(name=tiny.source))
    assert lm.d_model == 80 and tiny.source in lm.resolved.identity
    assert len(models.decoder_layers(lm.model)) == 4


@pytest.mark.parametrize(
    "name, problem",
    [("no-such-model", "is not a registry name"), ("./missing/dir", "is not a registry name"), ("org/model", "hub")],
)
def test_unknown_models_name_the_fix(name, problem):
    with pytest.raises(UserInputError) as err:
        models.resolve(ModelConfig(name=name))
    assert str(err.value).startswith("model.name:") and problem in str(err.value) and "fix:" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        models.resolve(ModelConfig(name=str(tmp_path)))


def test_runtime_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    rt = models.resolve_runtime(ModelConfig())
    assert (rt.device.type, rt.dtype, rt.autocast) == ("cpu", torch.float32, torch.bfloat16)
    ref = models.resolve_runtime(ModelConfig(autocast="none"))
    assert ref.autocast is None and ref.precision == "weights=float32,autocast=none"
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.resolve_runtime(ModelConfig()).autocast is None
    with pytest.raises(UserInputError, match="no GPU"):
        models.resolve_runtime(ModelConfig(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = models.resolve_runtime(ModelConfig())  # what a GPU machine gets by config alone
    assert (gpu.device.type, gpu.dtype, gpu.autocast) == ("cuda", torch.bfloat16, None)


@pytest.mark.integration
def test_smollm2_offline_converts_once_and_answers_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXPLAIN_MODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="smollm2-135m-instruct", autocast="none")
    first = models.resolve(cfg)
    assert first.converted
    weights = next((tmp_path).glob("smollm2-135m-instruct-*/model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    lm = models.load(cfg)  # second resolve inside: must not convert again
    assert not lm.resolved.converted and weights.stat().st_mtime_ns == stamp
    assert (lm.n_layers, lm.d_model) == (30, 576)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    enc = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        assert torch.isfinite(lm.model(**enc).logits).all()
        outs = [lm.model.generate(**enc, max_new_tokens=10, do_sample=False) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert "Paris" in lm.tokenizer.decode(outs[0][0, enc["input_ids"].shape[1] :])


def test_a_frozen_model_stores_its_block_linears_as_autocast_computes_with_them():
    """Under autocast a frozen load keeps every decoder-block linear in bf16 and computes the same bits."""
    cfg = ModelConfig(name="tiny-llama", autocast="bfloat16")
    plain, frozen = models.load(cfg), models.load(cfg, frozen=True)
    blocks = models.decoder_layers(frozen.model)
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7  # q k v o gate up down in each of 4 blocks
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}
    assert frozen.model.get_input_embeddings().weight.dtype == torch.float32  # read outside autocast too
    assert not any(p.requires_grad for p in frozen.model.parameters())
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad(), plain.runtime.autocast_context():
        assert torch.equal(plain.model(ids).logits, frozen.model(ids).logits)
    unmixed = models.load(ModelConfig(name="tiny-llama", autocast="none"), frozen=True)
    assert models.store_frozen_linears(unmixed.model, unmixed.runtime) == 0
    assert {p.dtype for p in unmixed.model.parameters()} == {torch.float32}


def test_attention_runs_another_kernel_and_restores_the_models_own():
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    own = lm.model.config._attn_implementation
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        reference = lm.model(ids).logits
        with models.attention(lm.model, "eager"):
            assert lm.model.config._attn_implementation == "eager"
            torch.testing.assert_close(lm.model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    assert own != "eager" and lm.model.config._attn_implementation == own
