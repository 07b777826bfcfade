"""The service's joins: one JSON form of a caption (Caption.to_dict) and the Protocols its stand-ins satisfy."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from captioner import Captioner
from captioner.api import Caption
from captioner.concepts import Concept
from service.app import EXTENSION_KEY, create_app
from service.batching import MicroBatcher
from service.protocols import Batcher, BatchModel, ServedModel

from conftest import image_bytes, make_image
from test_service import FakeCaptioner, GatedCaptioner


def two_word_caption(alternatives: list[Caption] | None = None) -> Caption:
    grid = np.array([[[0.1234564, 0.8765436]], [[1 / 3, 2 / 3]]], dtype=np.float32)  # (T=2, H=1, W=2)
    return Caption(
        "a dog",
        ["a", "dog"],
        [-0.123456, -1.00004],
        grid,
        -1.234567,
        alternatives=alternatives or [],
        concepts=[Concept("dog", 0.912345)],
    )


def test_caption_json_rounds_scores_to_4_and_attention_to_6_decimals() -> None:
    out = two_word_caption().to_dict()
    assert out == {
        "caption": "a dog",
        "score": -1.2346,
        "tokens": [
            {"word": "a", "logprob": -0.1235, "attention": [[0.123456, 0.876544]]},
            {"word": "dog", "logprob": -1.0, "attention": [[0.333333, 0.666667]]},
        ],
        "concepts": [{"word": "dog", "probability": 0.9123}],
    }
    assert "0.123456," in json.dumps(out)  # short decimals, not float32 noise such as 0.12345600128173828


def test_caption_json_forms_of_the_cli_and_the_service() -> None:
    alt = Caption("a cat", ["a", "cat"], [-0.5, -0.5], np.zeros((2, 1, 2), np.float32), -2.0)
    cli = two_word_caption().to_dict(attention=False)  # the CLI's record: no grids, alternatives only with n-best
    assert list(cli) == ["caption", "score", "tokens", "concepts"] and set(cli["tokens"][0]) == {"word", "logprob"}
    assert "alternatives" in two_word_caption([alt]).to_dict(attention=False)
    service = two_word_caption().to_dict(overlays=["data:x", "data:y"], complete=True)
    assert list(service) == ["caption", "score", "tokens", "grid", "alternatives", "concepts"]
    assert service["grid"] == [1, 2] and service["alternatives"] == []
    assert [t["overlay"] for t in service["tokens"]] == ["data:x", "data:y"]


def test_cli_record_is_the_captions_json_form(tiny_checkpoint, tmp_path) -> None:
    from captioner.commands.main import main

    path = tmp_path / "a.png"
    make_image(4).save(path)
    out = tmp_path / "caps.jsonl"
    assert (
        main(
            [
                "caption",
                str(path),
                "--checkpoint",
                str(tiny_checkpoint),
                "--output",
                str(out),
                "--n-best",
                "2",
                "--beam-size",
                "2",
                "-q",
            ]
        )
        == 0
    )
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    model = Captioner.load(tiny_checkpoint, device="cpu")
    assert record == {"image": str(path)} | model.caption(str(path), beam_size=2, n_best=2).to_dict(attention=False)


def test_service_answer_is_the_captions_json_form(tiny_checkpoint) -> None:
    model = Captioner.load(tiny_checkpoint, device="cpu")
    app = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "TESTING": True,
        }
    )
    try:
        data = image_bytes(make_image(3))
        response = app.test_client().post(
            "/v1/captions?n_best=2&beam_size=2", data={"image": (io.BytesIO(data), "a.jpg", "image/jpeg")}
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
    finally:
        app.extensions[EXTENSION_KEY].close()
    expected = model.caption(data, beam_size=2, n_best=2).to_dict(complete=True)
    assert list(body)[: len(expected)] == list(expected)
    assert {k: body[k] for k in expected if k != "tokens"} == {k: v for k, v in expected.items() if k != "tokens"}
    for got, want in zip(body["tokens"], expected["tokens"], strict=True):
        assert got["word"] == want["word"] and got["logprob"] == pytest.approx(want["logprob"], abs=2e-4)
        np.testing.assert_allclose(got["attention"], want["attention"], atol=1e-5)
        assert all(len(f"{v}".split(".")[-1]) <= 6 for row in got["attention"] for v in row)


def test_the_service_stand_ins_satisfy_its_protocols(tiny_checkpoint) -> None:
    model = Captioner.load(tiny_checkpoint, device="cpu")
    assert isinstance(model, ServedModel) and isinstance(GatedCaptioner(model), ServedModel)
    assert isinstance(FakeCaptioner(), BatchModel) and not isinstance(FakeCaptioner(), ServedModel)
    batcher = MicroBatcher(FakeCaptioner())
    assert isinstance(batcher, Batcher)
    assert not isinstance(object(), BatchModel) and not isinstance(torch.zeros(1), Batcher)
