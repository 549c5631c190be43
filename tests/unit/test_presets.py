"""The agent preset's decisions, from fake environments (no shell, no rustc)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from sandbox.core.errors import UsageError
from sandbox.run import presets

HOST = ("x86_64-unknown-linux-gnu", "test")
NATIVE = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS"
WASM = "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS"


def preset(environ: dict[str, str], **kwargs: object) -> dict[str, str | None]:
    return presets.agent_environment(environ, triple=HOST, **kwargs).changes  # type: ignore[arg-type]


def test_defaults_are_one_job_everywhere() -> None:
    changes = preset({})
    for name in presets.THREAD_VARIABLES:
        assert changes[name] == "1"
    assert changes["CARGO_INCREMENTAL"] == "1"
    assert changes["PW_TEST_WORKERS"] == "1"
    assert changes["NODE_OPTIONS"] == "--max-old-space-size=4096"
    assert changes[NATIVE] == "-C link-arg=-Wl,--threads=1"
    assert changes[WASM] == "-C link-arg=--threads=1"
    assert "RUSTFLAGS" not in changes and "CARGO_HOME" not in changes


def test_jobs_from_the_environment_or_the_option() -> None:
    changes = preset({"AERO_CARGO_BUILD_JOBS": "4"})
    assert changes["RAYON_NUM_THREADS"] == "4" and changes[WASM].endswith("--threads=4")
    assert preset({"AERO_CARGO_BUILD_JOBS": "4"}, jobs=2)["CARGO_BUILD_JOBS"] == "2"
    for bad in ("0", "x", "-2"):
        with pytest.raises(UsageError, match="AERO_CARGO_BUILD_JOBS"):
            preset({"AERO_CARGO_BUILD_JOBS": bad})


def test_node_options_are_merged_not_replaced() -> None:
    assert preset({"NODE_OPTIONS": "--enable-source-maps"})["NODE_OPTIONS"] == (
        "--enable-source-maps --max-old-space-size=4096"
    )
    mine = "--max-old-space-size=8192 --trace-warnings"
    assert preset({"NODE_OPTIONS": mine})["NODE_OPTIONS"] == mine


def test_flags_already_present_are_kept_and_the_cap_replaced() -> None:
    changes = preset(
        {
            NATIVE: "-C target-cpu=native  -C link-arg=-Wl,--threads=8",
            WASM: "-C target-feature=+simd128 -Clink-arg=-Wl,--threads=2",
        },
        jobs=3,
    )
    assert changes[NATIVE] == "-C target-cpu=native -C link-arg=-Wl,--threads=3"
    # The wasm linker takes no -Wl,: an old native-style cap there is dropped.
    assert changes[WASM] == "-C target-feature=+simd128 -C link-arg=--threads=3"


def test_applying_twice_leaves_one_cap() -> None:
    environ: dict[str, str] = {}
    for _ in range(2):
        presets.apply(presets.agent_environment(environ, triple=HOST), environ)
    assert environ[NATIVE].count("--threads") == 1 and environ[WASM].count("--threads") == 1
    assert environ["NODE_OPTIONS"].count("max-old-space-size") == 1


def test_the_cap_leaves_global_rustflags() -> None:
    changes = preset({"RUSTFLAGS": "-C link-arg=-Wl,--threads=1"})
    assert changes["RUSTFLAGS"] is None  # nothing else was in it: unset
    changes = preset({"RUSTFLAGS": "-Dwarnings -C link-arg=-Wl,--threads=1"})
    assert changes["RUSTFLAGS"] == "-Dwarnings"
    encoded = "-Dwarnings\x1f-C\x1flink-arg=-Wl,--threads=2"
    assert preset({"CARGO_ENCODED_RUSTFLAGS": encoded})["CARGO_ENCODED_RUSTFLAGS"] == "-Dwarnings"
    assert "RUSTFLAGS" not in preset({"RUSTFLAGS": "-Dwarnings"})  # untouched: no cap in it
    notes = presets.agent_environment({"RUSTFLAGS": "-Dwarnings"}, triple=HOST).notes
    assert any("RUSTFLAGS is set" in note for note in notes)


def test_no_host_triple_still_caps_wasm() -> None:
    env = presets.agent_environment({}, triple=(None, "no rustc on PATH"))
    assert WASM in env.changes
    assert not any(k.startswith("CARGO_TARGET_X86") for k in env.changes)
    assert any("no rustc" in note for note in env.notes)


def test_codegen_units_and_its_alias() -> None:
    assert preset({"AERO_RUST_CODEGEN_UNITS": "1"})["CARGO_PROFILE_DEV_CODEGEN_UNITS"] == "1"
    assert preset({"AERO_CODEGEN_UNITS": "2"})["CARGO_PROFILE_DEV_CODEGEN_UNITS"] == "2"
    both = {"AERO_RUST_CODEGEN_UNITS": "4", "AERO_CODEGEN_UNITS": "2"}
    assert preset(both)["CARGO_PROFILE_DEV_CODEGEN_UNITS"] == "4"
    assert "CARGO_PROFILE_DEV_CODEGEN_UNITS" not in preset({})
    with pytest.raises(UsageError, match="AERO_CODEGEN_UNITS"):
        preset({"AERO_CODEGEN_UNITS": "many"})


def test_sccache_wrappers_are_cleared_others_kept() -> None:
    changes = preset(
        {
            "RUSTC_WRAPPER": "/usr/local/bin/sccache",
            "CARGO_BUILD_RUSTC_WRAPPER": "sccache --flag",
            "RUSTC_WORKSPACE_WRAPPER": "ccache",
        }
    )
    assert changes["RUSTC_WRAPPER"] is None and changes["CARGO_BUILD_RUSTC_WRAPPER"] is None
    assert "RUSTC_WORKSPACE_WRAPPER" not in changes


def test_all_wrappers_disabled_on_request() -> None:
    changes = preset({"AERO_DISABLE_RUSTC_WRAPPER": "1", "RUSTC_WRAPPER": "ccache"})
    # Empty, not unset: an empty value also overrides build.rustc-wrapper in Cargo's config.
    assert all(changes[name] == "" for name in presets.WRAPPERS)
    with pytest.raises(UsageError, match="AERO_DISABLE_RUSTC_WRAPPER"):
        preset({"AERO_DISABLE_RUSTC_WRAPPER": "maybe"})


def test_isolated_cargo_home(tmp_path: Path) -> None:
    checkout = tmp_path / "repo"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "crates" / "a").mkdir(parents=True)
    where = str(checkout / "crates" / "a")
    assert preset({"AERO_ISOLATE_CARGO_HOME": "1"}, cwd=where)["CARGO_HOME"] == str(
        checkout / ".cargo-home"
    )
    custom = preset({"AERO_ISOLATE_CARGO_HOME": "~/cargo-x"}, cwd=where)["CARGO_HOME"]
    assert custom == os.path.expanduser("~/cargo-x")
    assert "CARGO_HOME" not in preset({"AERO_ISOLATE_CARGO_HOME": "0"}, cwd=where)
    # Outside any checkout: the directory itself.
    alone = tmp_path / "alone"
    alone.mkdir()
    assert presets.checkout_root(str(alone)) == str(alone)


def test_target_variable_names() -> None:
    assert presets.target_flags_variable("aarch64-unknown-linux-musl") == (
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS"
    )
    assert presets.target_flags_variable("thumbv7em-none-eabihf") == (
        "CARGO_TARGET_THUMBV7EM_NONE_EABIHF_RUSTFLAGS"
    )


def test_host_triple_without_rustc() -> None:
    triple, source = presets.host_triple()
    if os.uname().machine == "x86_64" and os.path.exists("/lib64/ld-linux-x86-64.so.2"):
        assert triple == "x86_64-unknown-linux-gnu" and "uname" in source


@pytest.mark.parametrize(
    "value", ["plain", "with space", "it's", "a'b'c", "$HOME `id` $(id) \\n", "new\nline", ""]
)
def test_posix_quoting_keeps_every_character(value: str) -> None:
    env = presets.Environment()
    env.changes["X"] = value
    text = presets.render(env, "bash")
    assert text.startswith("export X='")
    assert shlex.split(text.removeprefix("export ")) == [f"X={value}"]  # bash itself: host tests


def test_fish_and_unset_forms() -> None:
    env = presets.Environment()
    env.changes.update({"A": "it's \\ fine", "B": None})
    assert presets.render(env, "fish") == "set -gx A 'it\\'s \\\\ fine'\nset -e B\n"
    assert presets.render(env, "bash") == "export A='it'\\''s \\ fine'\nunset B\n"


def test_json_form_is_plain_data() -> None:
    env = presets.agent_environment({"RUSTC_WRAPPER": "sccache"}, triple=HOST)
    data = json.loads(json.dumps({"env": env.changes}))
    assert data["env"]["RUSTC_WRAPPER"] is None and data["env"]["CARGO_BUILD_JOBS"] == "1"
