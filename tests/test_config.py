"""EngineConfig validation: runs before the model loads, and a bad argument raises ValueError naming it."""
from __future__ import annotations

import importlib
import warnings

import pytest

from alise.config import DTYPE_CHOICES, EngineConfig


@pytest.mark.parametrize("kwargs, name", [
    # kv_cache_memory_gb: None or a finite number > 0
    (dict(kv_cache_memory_gb=float("inf")), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=float("nan")), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb="1"), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=True), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=0), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=-1.0), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=10 ** 400), "kv_cache_memory_gb"),     # an int too large for a float
    # swap_space_gb: a finite number >= 0
    (dict(swap_space_gb=float("inf")), "swap_space_gb"),
    (dict(swap_space_gb=float("nan")), "swap_space_gb"),
    (dict(swap_space_gb="1"), "swap_space_gb"),
    (dict(swap_space_gb=True), "swap_space_gb"),
    (dict(swap_space_gb=None), "swap_space_gb"),
    (dict(swap_space_gb=-0.5), "swap_space_gb"),
    # seed: an int in [0, 2**63 - 1], not a bool
    (dict(seed=True), "seed"),
    (dict(seed=False), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(seed="0"), "seed"),
    (dict(seed=None), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 63), "seed"),
    (dict(seed=2 ** 70), "seed"),
    # the other options
    (dict(predictor_history=3), "predictor_history"),
    (dict(predictor_history=True), "predictor_history"),
    (dict(swap_kv_dtype="fp8"), "swap_kv_dtype"),
    (dict(swap_kv_dtype="bfloat16"), "swap_kv_dtype"),
    (dict(dtype="float16"), "dtype"),
    (dict(dtype="bf16"), "dtype"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(block_size=0), "block_size"),
    (dict(kv_cache_blocks=2.0), "kv_cache_blocks"),
    (dict(compile="yes"), "compile"),
])
def test_bad_option_raises_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(**kwargs)


def test_missing_predictor_history_file_is_refused_before_the_model_loads(tmp_path):
    missing = tmp_path / "histroy.jsonl"                        # a typo
    with pytest.raises(ValueError, match="predictor_history") as info:
        EngineConfig(model="no-such-model-is-loaded", predictor_history=str(missing))
    assert "histroy.jsonl" in str(info.value)
    with pytest.raises(ValueError, match="predictor_history"):  # a folder is not a history file
        EngineConfig(predictor_history=str(tmp_path))


def test_existing_predictor_history_file_is_accepted(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text('{"prompt": "hi", "output_len": 3}\n')
    assert EngineConfig(predictor_history=str(history)).predictor_history == str(history)
    assert EngineConfig(predictor_history=history).predictor_history == history     # a Path works too


@pytest.mark.parametrize("kwargs", [
    dict(kv_cache_memory_gb=None), dict(kv_cache_memory_gb=1), dict(kv_cache_memory_gb=0.25),
    dict(swap_space_gb=0), dict(swap_space_gb=0.0), dict(swap_space_gb=2),
    dict(seed=0), dict(seed=2 ** 63 - 1), dict(seed=12345),
    dict(swap_kv_dtype="int8"), dict(swap_kv_dtype="int4"), dict(swap_kv_dtype="auto"),
    dict(dtype="auto"), dict(dtype="bfloat16"), dict(dtype="float32"),
])
def test_good_options_are_accepted_without_warnings(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = EngineConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


def test_defaults_are_auto_and_valid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = EngineConfig()
    assert config.swap_kv_dtype == "auto"       # swapped KV copied exactly: outputs do not depend on load
    assert config.dtype == "auto"
    assert "auto" in DTYPE_CHOICES


def test_swap_kv_dtype_bf16_is_a_deprecated_alias_of_auto():
    with pytest.warns(DeprecationWarning, match='"auto"'):
        config = EngineConfig(swap_kv_dtype="bf16")
    assert config.swap_kv_dtype == "auto"


def test_renamed_options_still_work_and_warn(tiny_model_dir):
    """``scheduler=`` is now ``policy=`` and ``predictor=`` is ``embedder=``: the old keywords work for one release."""
    with pytest.warns(DeprecationWarning, match="use policy="):
        config = EngineConfig(scheduler="fcfs")
    assert config.policy == "fcfs"
    with pytest.warns(DeprecationWarning, match="use embedder="):
        config = EngineConfig(predictor="minilm")
    assert config.embedder == "minilm"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="policy"):
        EngineConfig(scheduler="sjf")                          # a bad value is named by the new name
    from alise import LLM
    with pytest.warns(DeprecationWarning, match="use policy="):
        llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_blocks=16, scheduler="oracle")
    assert llm.engine.config.policy == "oracle"


@pytest.mark.parametrize("module, default, other", [("alise.serve", "alise", "fcfs"),
                                                     ("alise.bench.generate", "fcfs", "alise")])
def test_renamed_command_line_flags_still_work_and_warn(module, default, other):
    build_parser = importlib.import_module(module).build_parser
    assert build_parser().parse_args([]).policy == default
    with pytest.warns(FutureWarning, match="--scheduler is deprecated: use --policy"):
        args = build_parser().parse_args(["--scheduler", other])
    assert args.policy == other and not hasattr(args, "scheduler")


def test_renamed_embedder_flag_still_works_and_warns():
    from alise.serve import build_parser
    with pytest.warns(FutureWarning, match="--predictor is deprecated: use --embedder"):
        args = build_parser().parse_args(["--predictor", "minilm"])
    assert args.embedder == "minilm" and not hasattr(args, "predictor")
