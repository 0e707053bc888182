"""Upstream facts the KServe / Seldon capture relies on, checked without a server: the documented
KServe config matches what the agent compares, upstream sample bodies parse, and the stream
settings keep existing configs valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from patchd.config import SourcesConfig
from patchd.exceptions import ValidationError
from patchd.plugins.sources.payloads import (
    InputRef,
    oip_inputs,
    parse_oip_tensors,
    split_binary,
    v1_inputs,
)
from tests import capture_upstream as up

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = [ROOT / "docs" / "capture.md", ROOT / "patchd" / "plugins" / "sources" / "kserve.py"]


def go_canonical(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey for a valid header name: each dash-separated word
    upper-case first letter, lower-case rest (what the KServe agent compares metadataHeaders to)."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


def test_documented_metadata_headers_are_in_go_canonical_form() -> None:
    found = []
    for path in DOCUMENTED:
        for line in path.read_text().splitlines():
            match = re.search(r"metadataHeaders:\s*(\[.*\])", line)
            if match:
                found.extend(json.loads(match.group(1)))
    assert found, "no metadataHeaders example found"
    assert [go_canonical(h) for h in found] == found


def test_kserve_samples_with_leading_newline_and_b64_forms_give_inputs() -> None:
    mnist = up.sample("mnist.json")
    body, tail = split_binary(mnist, None)
    assert mnist[:1] == b"\n" and tail == b""
    (ref,) = v1_inputs(body, inline=True)
    assert ref is not None and ref.data is not None and ref.data.startswith(b"\x89PNG")
    tf_body, _ = split_binary(up.sample("tensorflow_input.json"), None)
    (jpeg,) = v1_inputs(tf_body, inline=True)
    assert jpeg is not None and jpeg.data is not None and jpeg.data.startswith(b"\xff\xd8\xff")
    v2_body, v2_tail = split_binary(up.sample("mnist_v2_bytes.json"), None)
    (png,) = oip_inputs(parse_oip_tensors(v2_body, "inputs", v2_tail), inline=True)
    assert png is not None and png.data is not None and png.data.startswith(b"\x89PNG")


@pytest.mark.parametrize("value", [9, 10, 11, 12, 13, 32])
def test_a_whitespace_binary_tail_is_tensor_data(value: int) -> None:
    header, tail = split_binary(up.uint8_label_response([value]), None)
    (tensor,) = parse_oip_tensors(header, "outputs", tail)
    assert tensor.data == (value,)


def test_json_bodies_may_end_in_whitespace_but_binary_tails_are_exact() -> None:
    header, tail = split_binary(up.v2_probs_body([1]) + b"\r\n", None)
    assert len(parse_oip_tensors(header, "outputs", tail)) == 1
    header, tail = split_binary(up.uint8_label_response([3]) + b" ", None)
    with pytest.raises(ValidationError) as err:
        parse_oip_tensors(header, "outputs", tail)
    assert err.value.reason == "binary_truncated"


def test_unusable_instance_inputs_carry_the_reason_they_are_dropped() -> None:
    items = [{"image_bytes": {"b64": "@@"}}, [1.0, 2.0], {"data": "aGVsbG8="}]
    assert v1_inputs({"instances": items}, inline=True) == [
        InputRef(dropped="not_base64"),
        InputRef(dropped="no_image"),
        InputRef(data=b"hello"),  # decoded; serve drops it as not_image (not PNG/JPEG)
    ]


def test_stream_settings_default_and_keep_existing_configs_valid() -> None:
    old = SourcesConfig.model_validate(
        {"kserve": {"ttl_s": 5, "group_headers": {"X-Camera-Id": "camera"}}, "seldon": {}}
    )
    assert old.kserve.component == "predictor" and old.kserve.endpoint_group == "endpoint"
    assert old.kserve.endpoints is None and old.seldon.node is None
    new = SourcesConfig.model_validate(
        {"kserve": {"component": "transformer", "endpoints": ["default"]}, "seldon": {"node": "m"}}
    )
    assert new.kserve.component == "transformer" and new.seldon.node == "m"
    with pytest.raises(ValueError, match="node"):
        SourcesConfig.model_validate({"kserve": {"node": "m"}})  # a Seldon-only setting
