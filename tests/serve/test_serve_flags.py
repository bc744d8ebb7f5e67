"""Every serve flag is checked before the model loads: one error line, exit status 2 (in process)."""

import pytest

from nxtp_jax.cli.serve import serve_command


@pytest.mark.parametrize("flag, words", [
    ("--port=70000", "--port=70000: 70000 is not an integer in the range [1, 65535]"),
    ("--port=0", "--port=0: 0 is not an integer in the range [1, 65535]"),
    ("--timeout_s=-1", "--timeout_s must be > 0"),
    ("--timeout_s=0", "--timeout_s must be > 0"),
    ("--max_queue=0", "--max_queue=0: 0 is not a positive integer"),
    ("--max_body_mb=-1", "--max_body_mb must be > 0"),
    ("--max_pixels=0", "--max_pixels=0"),
    ("--max_batch=0", "--max_batch=0"),
    ("--max_num_labels=0", "--max_num_labels=0"),
    ("--max_images=0", "--max_images=0"),
    ("--decode_threads=0", "--decode_threads=0"),
    ("--header_timeout_s=0", "--header_timeout_s must be > 0"),
    ("--keep_alive_s=-5", "--keep_alive_s must be > 0"),
    ("--max_connections=0", "--max_connections=0"),
    ("--drain_s=-1", "--drain_s=-1: -1.0 is not a non-negative number"),
    ("--max_wait_ms=-1", "--max_wait_ms=-1: -1.0 is not a non-negative number"),
    ("--max_inflight_mb=10", "--max_inflight_mb must be at least --max_body_mb (one request's body)"),
    ("--max_connections=100000000", "--max_connections=100000000 needs 100000256 open files, the limit is"),
])
def test_a_bad_flag_is_one_line_and_exit_2_before_the_model_loads(capsys, flag, words):
    assert serve_command(["--ckpt=/nonexistent/ckpt", flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_an_api_key_file_without_keys_is_refused(capsys, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n  \n")
    assert serve_command(["--ckpt=/nonexistent/ckpt", f"--api_key_file={keys}"]) == 2
    assert f"--api_key_file '{keys}' has no key" in capsys.readouterr().err
