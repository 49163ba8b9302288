//! Builds the kernel programs (`detector-ebpf`) with nightly and bpf-linker
//! and leaves the object in OUT_DIR, where `kernel::loader` embeds it.
//! `cargo xtask setup` installs what this needs; `AYA_BUILD_SKIP=1` skips it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("detector has no parent directory"))?;
    let ebpf_dir = root.join("detector-ebpf");
    // Also rebuild when the shared types change.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("detector-common/src").display()
    );
    aya_build::build_ebpf(
        [Package {
            name: "detector-ebpf",
            root_dir: ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
