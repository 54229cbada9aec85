import re
from pathlib import Path

import pytest
import yaml

from cmat_pipeline.config import PROFILES, Params, build, dump_params, load_params, profile_params
from cmat_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_params_yaml_is_the_default_profile():
    assert load_params(REPO / "params.yaml") == profile_params("default")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_validates(name):
    assert isinstance(profile_params(name), Params)


def test_dump_round_trips(tmp_path):
    params = profile_params("gpu")
    path = tmp_path / "p.yaml"
    path.write_text(dump_params(params))
    assert load_params(path) == params


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"generation": {"batch_sise": 4}}, "generation.batch_sise: unknown key; allowed keys here: max_new_tokens"),
        ({"generation": {"batch_size": "four"}}, "generation.batch_size: expected int, got str 'four'"),
        ({"generation": {"batch_size": True}}, "generation.batch_size: expected int, got bool"),
        ({"generation": {"batch_size": 0}}, "generation.batch_size: must be >= 1"),
        ({"db": {"backend": "postgres"}}, "db.backend: 'postgres' is not allowed; choose one of 'sqlite', 'mysql'"),
        ({"db": {"mysql": {"port": 70000}}}, "db.mysql.port: must be a TCP port"),
        ({"generation": {"max_new_tokens": 300, "max_context_tokens": 256}}, "generation.max_context_tokens: must be larger"),
        ({"evaluate": {"limit": -1}}, "evaluate.limit: must be >= 0"),
        ({"openai": {"base_url": "localhost:8000"}}, "openai.base_url: must start with http"),
        ({"modle": {}}, "modle: unknown key; allowed keys here: model, generation"),
        ({"generation": {"stop": "x"}}, "generation.stop: expected a list"),
        ({"generation": {"stop": [1]}}, "generation.stop[0]: expected str, got int 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, fragment):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, data))
    assert fragment in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_int_is_accepted_for_float(tmp_path):
    assert load_params(write(tmp_path, {"generation": {"temperature": 1}})).generation.temperature == 1.0


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, {})
    assert load_params(path, ["generation.batch_size=3", "db.backend=mysql"]).generation.batch_size == 3
    with pytest.raises(ConfigError, match="generation.batch_size: must be >= 1"):
        load_params(path, ["generation.batch_size=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(path, ["generation.batch_size"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="profile 'tpu' is unknown; choose one of default, gpu"):
        profile_params("tpu")


def _flatten(data, prefix=""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")


def _listed_params() -> list[tuple[str, str]]:
    """(stage, key) for every key a dvc.yaml stage lists under `params:`."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    listed = []
    for stage, spec in dvc["stages"].items():
        for entry in spec.get("params", []):
            keys = entry if isinstance(entry, str) else [k for v in entry.values() for k in (v or [])]
            listed.extend((stage, k) for k in ([keys] if isinstance(keys, str) else keys))
    return listed


def test_dvc_yaml_params_exist_in_params_yaml_and_dataclasses():
    """Every key a DVC stage lists under `params:` must be in params.yaml and in the dataclasses."""
    known = set(_flatten(yaml.safe_load((REPO / "params.yaml").read_text())))
    known_in_code = set(_flatten(Params().to_dict()))
    listed = _listed_params()
    assert listed, "dvc.yaml lists no params"
    missing = [(stage, key) for stage, key in listed if key not in known or key not in known_in_code]
    assert not missing, f"dvc.yaml params not in params.yaml/dataclasses: {missing}"


class _Reads:
    """A config (section) that records the dotted key of every value read from it; sections stay wrapped,
    methods (to_dict, for the resolved-params copy) pass through unrecorded."""

    def __init__(self, obj, seen: set, prefix: str = ""):
        self._obj, self._seen, self._prefix = obj, seen, prefix

    def __getattr__(self, name):
        import dataclasses

        value = getattr(self._obj, name)
        if dataclasses.is_dataclass(value):
            return _Reads(value, self._seen, f"{self._prefix}{name}.")
        if not callable(value):
            self._seen.add(self._prefix + name)
        return value


def test_dvc_yaml_collect_params_cover_every_key_collect_reads(tmp_path):
    """Collect a DB, a KG and an OS task with the oracle teacher, recording every params key the stage reads:
    each must be listed (itself or its section) under the collect stage's `params:`, or a change would not
    rerun collect. (Teacher keys of the other teachers are listed too; this run cannot see them.)"""
    import json

    from cmat_pipeline import collect as stage
    from tests.conftest import AGENTBENCH, require_bwrap

    require_bwrap()  # the OS task runs in the sandbox, which reads the os keys
    os_file = tmp_path / "os.json"
    os_file.write_text(json.dumps([json.loads((AGENTBENCH / "os_interaction" / "dev.json").read_text())[6]]))
    params = build(Params, {"collect": {"out_dir": str(tmp_path / "raw"), "db_tasks": 2, "kg_tasks": 2,
                                        "play_os": True, "import_tasks": [str(os_file)]}})
    seen: set = set()
    report = stage.collect(_Reads(params, seen), progress=False)
    assert report["trajectories"] == 5 and {"kg.endpoint", "os.driver", "db.max_rounds"} <= seen
    listed = [key for name, key in _listed_params() if name == "collect"]
    unlisted = sorted(k for k in seen if not any(k == key or k.startswith(key + ".") for key in listed))
    assert not unlisted, f"dvc.yaml: the collect stage reads {unlisted} but does not list them under params"


def test_every_field_is_documented():
    """Each dataclass field carries a docstring line right after it in config.py."""
    source = (REPO / "cmat_pipeline" / "config.py").read_text()
    import dataclasses

    from cmat_pipeline import config

    for cls in (config.ModelConfig, config.GenerationConfig, config.MySQLConfig, config.DBConfig,
                config.OpenAIConfig, config.EvaluateConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"\n    {f.name}: .*\n    \"\"\"", source), f"{cls.__name__}.{f.name} has no docstring"


def test_build_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="model: expected a mapping of ModelConfig keys"):
        build(Params, {"model": "smollm2"})
