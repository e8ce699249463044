"""gradwire.config: the "gradwire" section of a DeepSpeed JSON, validated before training."""
import glob
import json
import os

import pytest

from gradwire.config import (
    CodecSpec,
    ConfigError,
    check_topology,
    load_config,
    parse_codec,
    parse_gradwire,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_mean_no_compression():
    cfg = parse_gradwire(None)
    assert cfg.codec == CodecSpec(name="none")
    assert cfg.codec_for(0).name == "none"


def test_unknown_top_level_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        parse_gradwire({"codek": {"name": "fp", "bits": 6}})
    msg = str(e.value)
    assert "'codek'" in msg and "did you mean 'codec'" in msg and "allowed keys" in msg


def test_unknown_codec_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"gradwire.codec.*unknown key 'bitz'.*did you mean 'bits'"):
        parse_gradwire({"codec": {"name": "fp", "bitz": 6}})


def test_unknown_codec_name_suggests():
    with pytest.raises(ConfigError, match=r"gradwire.codec.name.*'fpp'.*did you mean 'fp'"):
        parse_codec({"name": "fpp", "bits": 6})


@pytest.mark.parametrize("codec, match", [
    ({"name": "fp", "bits": 2}, r"bits must be in \[3, 8\], got 2"),
    ({"name": "fp", "bits": 9}, r"bits must be in \[3, 8\], got 9"),
    ({"name": "fp", "bits": 6, "exp_bits": 6}, r"exp_bits must be in \[1, 5\], got 6"),
    ({"name": "fp", "bits": True}, r"bits must be an integer"),
    ({"name": "fp"}, r"needs \"bits\""),
    ({"name": "fp", "bits": 6, "rounding": "stochastik"}, r"did you mean 'stochastic'"),
    ({"name": "nm", "n": 2, "m": 2}, r"n must be < m"),
    ({"name": "nm", "n": 1, "m": 3}, r"m must be 2, 4 or 8"),
    ({"name": "nm", "n": 1, "m": 4, "method": "mvue"}, r"'mvue' exists for 1:2 or 2:4 only"),
    ({"name": "nm", "n": 1, "m": 2, "method": "mvue_approx"}, r"'mvue_approx' exists for 2:4 only"),
    ({"name": "prune", "sparsity": 1.0}, r"sparsity must be a number in \(0, 1\)"),
    ({"name": "prune"}, r"needs \"sparsity\""),
    ({"name": "prune", "sparsity": 0.8, "heterogeneous": "yes"}, r"heterogeneous must be true or false"),
    ({"name": "none", "bits": 8}, r"unknown key 'bits'"),
])
def test_impossible_codecs_fail_with_the_key(codec, match):
    with pytest.raises(ConfigError, match=match):
        parse_gradwire({"codec": codec})


def test_boundary_override_merges_same_codec_and_replaces_other():
    cfg = parse_gradwire({"codec": {"name": "fp", "bits": 6, "rounding": "nearest"},
                          "boundaries": {"1": {"bits": 8}, "2": {"name": "nm", "n": 1, "m": 2}}})
    assert cfg.codec_for(0) == CodecSpec(name="fp", bits=6, rounding="nearest")
    assert cfg.codec_for(1) == CodecSpec(name="fp", bits=8, rounding="nearest")  # merged
    assert cfg.codec_for(2) == CodecSpec(name="nm", n=1, m=2, method="mvue")  # replaced
    cfg.check_boundaries(4)
    with pytest.raises(ConfigError, match=r"boundary 2 does not exist with 3 pipeline stages"):
        cfg.check_boundaries(3)


def test_boundary_override_errors_name_the_boundary():
    with pytest.raises(ConfigError, match=r"gradwire.boundaries.1.*unknown key 'bit'"):
        parse_gradwire({"codec": {"name": "fp", "bits": 6}, "boundaries": {"1": {"bit": 8}}})
    with pytest.raises(ConfigError, match=r"key 'first' must be a boundary index"):
        parse_gradwire({"boundaries": {"first": {"name": "none"}}})


def test_disabled_section_means_identity_everywhere():
    cfg = parse_gradwire({"enabled": False, "codec": {"name": "fp", "bits": 4}})
    assert cfg.codec_for(0).name == "none"


def test_topology_errors_say_what_to_change():
    check_topology(world_size=4, num_stages=2, num_layers=6)
    with pytest.raises(ConfigError, match=r"3 pipeline stages .* does not divide the 2 ranks.*\[1, 2\]"):
        check_topology(world_size=2, num_stages=3, num_layers=6)
    with pytest.raises(ConfigError, match=r"need at least 8 layers.*raise --depth or lower --stages"):
        check_topology(world_size=1, num_stages=8, num_layers=6)


def test_load_config_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"train_batch_size": 8, "gradwire": {"codec": {"name": "fp", "bits": 6},
                                                                   "refresh_evry": 3}}))
    with pytest.raises(ConfigError, match=r"typo.json: gradwire: unknown key 'refresh_evry'.*'refresh_every'"):
        load_config(str(typo))


def test_shipped_configs_are_valid_and_round_trip():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))
    names = {os.path.basename(p) for p in paths}
    required = {"baseline.json", "fp8.json", "fp6.json", "fp5.json", "fp4.json", "prune80.json",
                "prune90-hetero.json", "nm12.json", "nm24.json", "nm24-fp8.json"}
    assert required <= names, required - names
    for p in paths:
        ds, gw = load_config(p)
        assert "gradwire" not in ds and "train_micro_batch_size_per_gpu" in ds
        # to_dict() of each spec parses back to the same spec
        assert parse_codec(gw.codec.to_dict()) == gw.codec


def test_data_parallel_section_accepts_dense_codecs_only():
    assert parse_gradwire({"data_parallel": {"name": "fp", "bits": 8}}).data_parallel == CodecSpec(name="fp", bits=8)
    with pytest.raises(ConfigError, match=r"gradwire.data_parallel: only 'none', 'bf16' and 'fp'"):
        parse_gradwire({"data_parallel": {"name": "nm", "n": 1, "m": 2}})
    with pytest.raises(ConfigError, match=r"gradwire.data_parallel .*unknown key 'bit'"):
        parse_gradwire({"data_parallel": {"name": "fp", "bit": 8}})


def test_stats_every_is_bounded_by_refresh_every():
    cfg = parse_gradwire({"codec": {"name": "fp", "bits": 6}, "refresh_every": 10, "stats_every": 5})
    assert cfg.stats_every == 5 and parse_gradwire({}).stats_every == 1
    from gradwire.integrations.deepspeed import make_policy

    assert make_policy(cfg, 0).config.stats_every == 5
    with pytest.raises(ConfigError, match=r"stats_every \(20\) must be <= gradwire.refresh_every \(10\)"):
        parse_gradwire({"refresh_every": 10, "stats_every": 20})
    with pytest.raises(ConfigError, match="stats_every must be"):
        parse_gradwire({"stats_every": 0})
    with pytest.raises(ConfigError, match="stats_every must be an integer"):
        parse_gradwire({"stats_every": True})
