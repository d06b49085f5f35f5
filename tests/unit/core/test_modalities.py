import pytest

from visionfm_core.errors import ConfigError, UnknownModalityError
from visionfm_core.modalities import MODALITIES, canonical_modality, get_modality


def test_eight_modalities_with_visionfm_normalisation() -> None:
    assert len(MODALITIES) == 8
    fundus = get_modality("fundus")
    assert fundus.mean == (0.4237, 0.2609, 0.1284)
    assert fundus.std == (0.2948, 0.2017, 0.1367)
    assert get_modality("oct").mean == (0.2109,) * 3


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("SlitLamp", "slit_lamp"), ("slit-lamp", "slit_lamp"), ("Ultrasound", "ultrasound"), ("B-scan", "ultrasound"),
     ("OCT", "oct"), ("ExternalEye", "external_eye"), ("external eye", "external_eye"), ("MRI", "mri"), ("FFA", "ffa")],
)
def test_upstream_spellings_resolve_to_one_name(spelling: str, canonical: str) -> None:
    assert canonical_modality(spelling) == canonical


def test_unknown_modality_is_a_config_error_that_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModalityError) as info:
        get_modality("xray")
    assert isinstance(info.value, ConfigError)
    assert "xray" in str(info.value) and "fundus" in str(info.value)
