"""Config hashes: what moves a result to a new key, and what must not."""

from pydantic import BaseModel, Field

from storage.hashing import canonical_json, config_hash


class Before(BaseModel):
    prompt_ablations: list[str] = ["no_layer"]
    gpu_memory: float = 0.5


class After(BaseModel):  # the field renamed, its old name kept for hashing; a resource knob left out
    prompt_omissions: list[str] = Field(["no_layer"], json_schema_extra={"hashed_as": "prompt_ablations"})
    gpu_memory: float = Field(0.9, json_schema_extra={"affects_results": False})


def test_a_renamed_field_keeps_its_key_and_a_resource_knob_has_none():
    assert canonical_json(After()) == '{"prompt_ablations":["no_layer"]}'
    assert canonical_json(Before()) == '{"gpu_memory":0.5,"prompt_ablations":["no_layer"]}'
    assert config_hash("s", 1, After()) == config_hash("s", 1, {"prompt_ablations": ["no_layer"]})
    assert config_hash("s", 1, After(prompt_omissions=["no_token"])) != config_hash("s", 1, After())


class Added(BaseModel):  # Before with an option added later: left out of the hash while at its default
    prompt_ablations: list[str] = ["no_layer"]
    gpu_memory: float = 0.5
    warmup: int = Field(0, json_schema_extra={"hashed_unless_default": True})


def test_an_added_field_at_its_default_keeps_the_old_key():
    assert canonical_json(Added()) == canonical_json(Before())
    assert canonical_json(Added(warmup=3)) == '{"gpu_memory":0.5,"prompt_ablations":["no_layer"],"warmup":3}'
    assert config_hash("s", 1, Added(warmup=3)) != config_hash("s", 1, Before())
