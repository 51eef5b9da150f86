//! Builds the eBPF program with the pinned nightly (aya-build) so the binary can
//! embed it.
use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../otel-tcpstates-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("{} is missing", ebpf_dir.display()))?;
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let toolchain = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = toolchain
        .lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", toolchain_file.display()))?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;

    // AYA_BUILD_SKIP (scripts/test.sh sets it for clippy): aya-build builds
    // nothing, and an empty object stands in so the crate still compiles; the
    // loader refuses to run with it.
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        for object in ["otel-tcpstates", "tcpstates-floor"] {
            fs::write(Path::new(&out_dir).join(object), b"")
                .context("writing the empty stand-ins for the eBPF objects")?;
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "otel-tcpstates-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
    .with_context(|| {
        format!("building the eBPF program with {channel} failed; run scripts/setup.sh (installs {channel} with rust-src and bpf-linker)")
    })
}
