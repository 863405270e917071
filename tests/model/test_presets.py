"""Presets equal the seed's shapes: parameter counts from the formula and from a real megatron GPTModel."""
import pytest

from tinyllm_mcore.model.build import transformer_config
from tinyllm_mcore.model.presets import PRESETS, get_preset, padded_vocab_size

SEED_PARAMS = {  # tiny-llm-zh at vocab 64798, counted from the seed's model code
    "16m": 16_730_280, "42m": 43_304_544, "92m": 92_064_256,
    "210m": 212_838_144, "440m": 441_111_552, "1.5b": 1_479_911_424,
}


@pytest.mark.parametrize("name", list(SEED_PARAMS))
def test_formula_matches_seed(name):
    assert PRESETS[name].num_parameters(64798) == SEED_PARAMS[name]


@pytest.fixture(scope="module")
def single_process():
    from tinyllm_mcore.runtime import distributed as rt

    rt.initialize()
    yield
    rt.destroy()


@pytest.mark.parametrize("name", ["16m", "42m", "92m"])
def test_megatron_model_has_seed_parameter_count(single_process, name):
    from tinyllm_mcore.model.build import build_model

    preset = get_preset(name)
    config = transformer_config(preset, use_cpu_initialization=True, perform_initialization=False)
    model = build_model(preset, config, make_vocab_size_divisible_by=1)  # no padding: the logical vocab
    assert sum(p.numel() for p in model.parameters()) == SEED_PARAMS[name]
    # the architecture facts: untied, bias on q/k/v only
    names = {n for n, _ in model.named_parameters()}
    assert "output_layer.weight" in names and "embedding.word_embeddings.weight" in names
    biases = sorted(n for n in names if n.endswith("bias"))
    assert biases and all("linear_qkv" in n for n in biases)


def test_padded_vocab_keeps_logical_vocab():
    assert padded_vocab_size(64798, 1) == 64896
    assert padded_vocab_size(64798, 2) % 256 == 0 and padded_vocab_size(64798, 2) >= 64798
    assert get_preset("92m", vocab_size=1000).vocab_size == 1000


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --model-size"):
        get_preset("93m")
