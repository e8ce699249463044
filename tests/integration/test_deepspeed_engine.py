"""GradwirePipelineEngine wiring that can be checked without launching ranks (the end-to-end
runs are in test_main_job.py)."""
import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed.runtime.pipe import schedule  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402

from gradwire.config import ConfigError, parse_gradwire  # noqa: E402
from gradwire.integrations.deepspeed import GradwirePipelineEngine, codec_from_spec, initialize  # noqa: E402


def test_instruction_map_dispatches_to_the_compressed_gradient_instructions():
    # DeepSpeed dispatches through the class dict: overriding the methods alone would be ignored.
    m = GradwirePipelineEngine._INSTRUCTION_MAP
    assert m[schedule.SendGrad] is GradwirePipelineEngine.__dict__["_exec_send_grads"]
    assert m[schedule.RecvGrad] is GradwirePipelineEngine.__dict__["_exec_recv_grads"]
    # every other instruction is DeepSpeed's own
    for k, v in PipelineEngine._INSTRUCTION_MAP.items():
        if k not in (schedule.SendGrad, schedule.RecvGrad):
            assert m[k] is v


def test_initialize_rejects_non_pipeline_models_and_bad_sections():
    with pytest.raises(TypeError, match="must be a deepspeed.pipe.PipelineModule"):
        initialize(model=torch.nn.Linear(2, 2), config={"train_batch_size": 1})
    with pytest.raises(ConfigError, match="unknown key 'codecs'; did you mean 'codec'"):
        initialize(model=torch.nn.Linear(2, 2), config={"gradwire": {"codecs": {}}})


def test_codec_from_spec_round_trips_every_shipped_codec_kind():
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    for section in ({"name": "none"}, {"name": "bf16"}, {"name": "fp", "bits": 6},
                    {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "prune", "sparsity": 0.8}):
        codec = codec_from_spec(parse_gradwire({"codec": section}).codec)
        y = codec.decode(codec.encode(x, seed=1))
        assert y.shape == x.shape and y.dtype == x.dtype
    ident = codec_from_spec(parse_gradwire({"codec": {"name": "none"}}).codec)
    assert torch.equal(ident.decode(ident.encode(x)), x)


def test_initialize_rejects_data_parallel_compression_with_zero():
    from deepspeed.pipe import PipelineModule  # noqa: F401  (only the type is checked first)

    class Fake(PipelineModule):
        def __init__(self):  # no process group needed: initialize fails before using it
            torch.nn.Module.__init__(self)

    with pytest.raises(ConfigError, match="does not apply with ZeRO"):
        initialize(model=Fake(), config={"zero_optimization": {"stage": 1},
                                         "gradwire": {"data_parallel": {"name": "fp", "bits": 8}}})
