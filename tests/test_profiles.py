from pathlib import Path

import pytest

from quant_profiles import ProfileError, ProfileRegistry, builtin_profiles, load_profile_file

REQUIRED = [
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_0",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "Q8_0",
    "F16",
    "BF16",
    "IQ4_XS",
    "IQ3_M",
]


def test_builtin_profiles_load_and_cover_the_common_types():
    registry = builtin_profiles()
    assert set(REQUIRED) <= set(registry.names())
    q4 = registry.get("Q4_K_M")
    assert q4.ftype_id == 15 and q4.gates.max_mean_kld > 0 and 0 < q4.gates.min_top1 <= 1
    assert registry.get("Q8_0").ftype_id == 7
    assert registry.get("F16").is_source("F16") and not registry.get("F16").is_source("BF16")
    assert registry.get("BF16").is_source("BF16") and not registry.get("Q8_0").is_source("F16")
    assert registry.get("IQ4_XS").needs_imatrix and not q4.needs_imatrix


@pytest.mark.parametrize("spelling", ["q4_k_m", "Q4_K_M", " q4km ", "Q4_K"])
def test_lookup_is_case_insensitive_and_accepts_aliases(spelling):
    assert builtin_profiles().get(spelling).name == "Q4_K_M"


def test_unknown_profile_lists_the_valid_names():
    with pytest.raises(ProfileError) as error:
        builtin_profiles().get("Q4_K_XL")
    message = str(error.value)
    assert "Q4_K_XL" in message
    for name in REQUIRED:
        assert name in message


def test_user_profile_file_is_validated_and_added(tmp_path: Path):
    good = tmp_path / "mine.toml"
    good.write_text(
        'name = "Q4_K_M-q8emb"\nftype = "q4_k_m"\nbits_per_weight = 5.1\ndescription = "Q4_K_M, Q8_0 embeddings"\n'
        '[overrides]\ntoken_embedding_type = "q8_0"\ntensor_types = { "ffn_down" = "Q6_K" }\n'
        "[gates]\nmax_mean_kld = 0.2\nmin_top1 = 0.8\n"
    )
    registry = builtin_profiles().with_files([good])
    profile = registry.get("q4_k_m-Q8EMB")
    assert profile.ftype == "Q4_K_M"
    assert profile.overrides.token_embedding_type == "Q8_0"
    assert profile.overrides.tensor_types == {"ffn_down": "Q6_K"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            'name = "X"\nftype = "Q9_K"\nbits_per_weight = 4\ndescription = "d"\n[gates]\nmax_mean_kld = 1\nmin_top1 = 0.5\n',
            "ftype",
        ),
        (
            'name = "X"\nftype = "Q4_0"\nbits_per_weight = 4\ndescription = "d"\ncolour = "red"\n'
            "[gates]\nmax_mean_kld = 1\nmin_top1 = 0.5\n",
            "colour",
        ),
        (
            'name = "X"\nftype = "Q4_0"\nbits_per_weight = 4\ndescription = "d"\n[gates]\nmax_mean_kld = 1\nmin_top1 = 1.5\n',
            "gates.min_top1",
        ),
        (
            'name = "X"\nftype = "Q4_0"\nbits_per_weight = 4\ndescription = "d"\n[overrides]\noutput_tensor_type = "q7"\n'
            "[gates]\nmax_mean_kld = 1\nmin_top1 = 0.5\n",
            "overrides.output_tensor_type",
        ),
        ('name = "X"\nftype = "Q4_0"\nbits_per_weight = 4\ndescription = "d"\n', "gates"),
    ],
)
def test_invalid_profile_file_names_the_field_and_the_file(tmp_path: Path, body: str, field: str):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ProfileError) as error:
        load_profile_file(path)
    assert str(path) in str(error.value)
    assert f"'{field}" in str(error.value)


def test_profile_file_that_is_not_toml(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("name = [unclosed\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(path)


def test_registry_refuses_a_duplicate_name_or_alias(tmp_path: Path):
    path = tmp_path / "dup.toml"
    path.write_text(
        'name = "Mine"\naliases = ["q4km"]\nftype = "Q4_K_M"\nbits_per_weight = 4.9\n'
        'description = "d"\n[gates]\nmax_mean_kld = 1\nmin_top1 = 0.5\n'
    )
    with pytest.raises(ProfileError, match="q4km"):
        builtin_profiles().with_files([path])
    with pytest.raises(ProfileError):
        ProfileRegistry.build([load_profile_file(path), load_profile_file(path)])
