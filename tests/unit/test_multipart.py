"""model-orchestrator/multipart.py: a form's ``model`` wherever it stands, from bodies the way clients encode
them (httpx's encoder, which the openai client uses), and clear refusals of bodies that are not forms."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_orchestrator.multipart import FormProblem, boundary_of, form_fields, is_form


def encoded(fields: dict[str, str], files: dict[str, tuple[str, bytes]], order: str = "fields first"
            ) -> tuple[bytes, bytes]:
    """(body, Content-Type) as httpx sends them; ``order`` puts the file before the fields or after."""
    request = httpx.Request("POST", "http://x/v1/audio/transcriptions", data=fields, files=files)
    body, content_type = request.read(), request.headers["content-type"].encode()
    if order == "file first":  # httpx writes fields first; clients differ: rebuild with the parts swapped
        delimiter = b"--" + boundary_of(content_type)
        parts = body.split(delimiter)[1:-1]
        files_first = [p for p in parts if b"filename=" in p] + [p for p in parts if b"filename=" not in p]
        body = delimiter + delimiter.join(files_first) + delimiter + b"--\r\n"
    return body, content_type


AUDIO = ("speech.wav", b"RIFF\x00\x00WAVEfmt " + bytes(range(256)) * 64)


@pytest.mark.parametrize("order", ["fields first", "file first"])
def test_the_model_wherever_it_stands(order: str) -> None:
    body, content_type = encoded({"model": "whisper", "response_format": "srt"}, {"file": AUDIO}, order)
    assert is_form(content_type)
    assert form_fields(body, content_type) == {"model": "whisper"}
    assert form_fields(body, content_type, ("model", "response_format")) == {"model": "whisper",
                                                                              "response_format": "srt"}


def test_a_file_named_model_is_not_the_field_and_file_bytes_that_look_like_a_form_are_data() -> None:
    tricky = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nnot-this\r\n--x'
    body, content_type = encoded({"stream": "true"}, {"model": ("model.wav", tricky)})
    assert form_fields(body, content_type) == {"stream": "true"}


@pytest.mark.parametrize(("content_type", "boundary"), [
    (b"multipart/form-data; boundary=abc123", b"abc123"),
    (b'Multipart/Form-Data; charset=utf-8; boundary="a b:c"', b"a b:c"),
])
def test_boundaries_quoted_or_not(content_type: bytes, boundary: bytes) -> None:
    assert boundary_of(content_type) == boundary
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name=model\r\n\r\nw\r\n--' + boundary + b"--\r\n")
    assert form_fields(body, content_type) == {"model": "w"}


GOOD = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nw\r\n--b--\r\n'


@pytest.mark.parametrize(("body", "content_type", "problem"), [
    (GOOD, b"multipart/form-data", "has no boundary"),
    (GOOD, b"multipart/form-data; boundary=other", "does not start with the boundary"),
    (GOOD[:-8], b"multipart/form-data; boundary=b", "closing boundary is missing"),
    (b'--b\r\nContent-Disposition: form-data; name="model"\r\nw\r\n--b--', b"multipart/form-data; boundary=b",
     "no blank line after its headers"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nw\r\n--b--", b"multipart/form-data; boundary=b",
     "no Content-Disposition"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nw\r\n--b--", b"multipart/form-data; boundary=b", "has no name"),
    (b'--bxx\r\nContent-Disposition: form-data; name="model"\r\n\r\nw\r\n--b--', b"multipart/form-data; boundary=b",
     "not followed by a line break"),
    (GOOD.replace(b"\r\nw\r\n", b"\r\n\xff\xfe\r\n"), b"multipart/form-data; boundary=b", "not UTF-8"),
    (GOOD.replace(b"\r\nw\r\n", b"\r\n" + b"w" * 5000 + b"\r\n"), b"multipart/form-data; boundary=b",
     "over 4096 bytes"),
])
def test_what_is_not_a_form_is_refused_with_why(body: bytes, content_type: bytes, problem: str) -> None:
    with pytest.raises(FormProblem, match=problem):
        form_fields(body, content_type)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(model=TEXT.filter(bool), others=st.dictionaries(st.sampled_from(["language", "prompt", "temperature"]), TEXT),
       audio=st.binary(max_size=2048), first=st.booleans())
def test_any_form_a_client_encodes_gives_its_model(model: str, others: dict[str, str], audio: bytes,
                                                   first: bool) -> None:
    body, content_type = encoded({**others, "model": model}, {"file": ("a.mp3", audio)},
                                 "file first" if first else "fields first")
    assert form_fields(body, content_type)["model"] == model
