//! Compiles every `kernels/*.cu` into one fatbin, `$OUT_DIR/tuneloop_kernels.fatbin`,
//! which `src/kernels.rs` embeds; sets `cfg(tuneloop_kernels)` when it did.
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH`. Without
//! one the crate builds without kernels (CPU backend only) and says so in a warning;
//! `TUNELOOP_REQUIRE_KERNELS=1` turns that into an error (CI sets it). With one, a kernel
//! that does not compile fails the build.
//!
//! All kernels are one translation unit: a generated file `#include`s each `.cu`, and a
//! single nvcc run builds SASS for Hopper (sm_90a, wgmma) and Ampere (sm_80) plus
//! compute_90 PTX that the driver can JIT for newer chips.
//!
//! With the kernels, it also builds the test suite's CUDA emulator (`tests/emu`, see
//! `tests/emu/driver.cpp`) with the host C++ compiler (`$CXX`, else `c++`): stand-ins for
//! libcuda.so, libcublasLt.so and libnccl.so, the kernels compiled for the CPU inside the
//! first, and the cuBLASLt stand-in's self-test, in `$OUT_DIR/emu`, whose path the tests get as `TUNELOOP_EMU_LIB_DIR`. A failure
//! there is a warning, or an error under `TUNELOOP_REQUIRE_KERNELS=1`.

use std::collections::BTreeMap;
use std::env;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const FATBIN_NAME: &str = "tuneloop_kernels.fatbin";

/// nvcc's flags besides the include path and the file names.
const NVCC_FLAGS: &[&str] = &[
    "-fatbin",
    // ptxas reports each kernel's registers, shared memory and spills (`resource_usage`)
    "--resource-usage",
    "-O3",
    "-std=c++17",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=compute_90",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tuneloop_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "PATH", "TUNELOOP_REQUIRE_KERNELS", "CXX"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kernels_dir = manifest_dir.join("kernels");

    // A directory is scanned as a whole, so a new .cu is noticed too.
    println!("cargo::rerun-if-changed={}", kernels_dir.display());
    let sources = kernel_files(&kernels_dir);
    for file in &sources.all {
        println!("cargo::rerun-if-changed={}", file.display());
    }

    let Some(nvcc) = find_nvcc() else {
        if env::var("TUNELOOP_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
            panic!(
                "TUNELOOP_REQUIRE_KERNELS=1 but no nvcc was found (looked in $NVCC, \
                 $CUDA_HOME/bin/nvcc and PATH). Install the CUDA 13.0 compiler, e.g. \
                 `eval \"$(scripts/nvcc-env.sh)\"`, or set NVCC to an nvcc binary."
            );
        }
        // Drop a fatbin from an earlier build with nvcc so nothing stale is left around.
        let _ = fs::remove_file(out_dir.join(FATBIN_NAME));
        println!(
            "cargo::warning=nvcc not found: building without CUDA kernels (CPU backend only). \
             Set NVCC, CUDA_HOME or PATH to enable them; `eval \"$(scripts/nvcc-env.sh)\"` \
             installs CUDA 13.0's nvcc from PyPI."
        );
        return;
    };

    let unit = out_dir.join("tuneloop_kernels.cu");
    fs::write(&unit, translation_unit(&sources.cu)).expect("write the kernels' translation unit");
    let fatbin = out_dir.join(FATBIN_NAME);
    let usage = compile(&nvcc, &kernels_dir, &unit, &fatbin);
    println!("cargo::rustc-cfg=tuneloop_kernels");
    // Spilled registers go through local memory: a kernel tuned for Hopper should not.
    for (name, u) in usage.iter().filter(|(_, u)| u.spill_bytes > 0) {
        println!(
            "cargo::warning=nvcc: kernel {name} spills {} bytes of registers on {EMULATED_ARCH} ({} registers a \
             thread)",
            u.spill_bytes, u.registers
        );
    }

    // A serialized wgmma pipeline waits for every product before the next: the overlap the
    // kernel was written for is gone. The probe (kernels/wgmma.cu) checks layouts, not speed:
    // its products sit behind a switch on the layout, which ptxas always serializes.
    for (name, u) in usage.iter().filter(|(name, _)| !name.starts_with("wgmma_probe_")) {
        if let Some(why) = &u.wgmma_serialized {
            println!(
                "cargo::warning=nvcc: kernel {name}'s wgmma products are serialized on {EMULATED_ARCH} (ptxas \
                 C7520: {why})"
            );
        }
    }

    let emu_src = manifest_dir.join("tests").join("emu");
    println!("cargo::rerun-if-changed={}", emu_src.display());
    match build_emulator(&emu_src, &kernels_dir, &sources.cu, &usage, &out_dir.join("emu")) {
        Ok(dir) => println!("cargo::rustc-env=TUNELOOP_EMU_LIB_DIR={}", dir.display()),
        Err(e) if env::var("TUNELOOP_REQUIRE_KERNELS").is_ok_and(|v| v == "1") => {
            panic!("cannot build the CUDA emulator of the tests (tests/emu): {e}")
        }
        Err(e) => println!("cargo::warning=CUDA emulator of the tests not built: {e}"),
    }
}

/// The `extern "C"` kernels of a `.cu` source with their `__launch_bounds__` maximum of
/// threads per block (1024 without one).
fn kernel_entries(src: &str) -> Vec<(String, u32)> {
    const DECL: &str = "extern \"C\" __global__ void";
    let mut entries = Vec::new();
    for (at, _) in src.match_indices(DECL) {
        let mut rest = src[at + DECL.len()..].trim_start();
        let mut bound = 1024;
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
            bound =
                digits.parse().unwrap_or_else(|_| panic!("unreadable __launch_bounds__ near {after:.40}"));
            let close = after.find(')').expect("__launch_bounds__ without ')'");
            rest = after[close + 1..].trim_start();
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "a kernel without a name near {rest:.40}");
        entries.push((name, bound));
    }
    entries
}

/// The architecture whose resources are read: the emulator enforces its limits (it
/// answers as an H100), and its spills are warned about.
const EMULATED_ARCH: &str = "sm_90a";

/// What ptxas reported for one kernel on one architecture.
#[derive(Default)]
struct Usage {
    registers: u32,
    /// Static shared memory in bytes.
    shared_bytes: u32,
    /// Bytes of spill stores and loads.
    spill_bytes: u32,
    /// Why ptxas serialized its wgmma products, if it did (C7520: each waits for the one
    /// before).
    wgmma_serialized: Option<String>,
}

/// Every kernel's [`Usage`] on [`EMULATED_ARCH`] by name, from the log of nvcc's
/// `--resource-usage`: for each kernel and architecture ptxas writes
/// `Compiling entry function 'NAME' for 'sm_90a'`, then a line with
/// `N bytes spill stores, M bytes spill loads` and one with
/// `Used R registers, ..., S bytes smem, ...` (no `smem` when it has none).
fn resource_usage(log: &str) -> BTreeMap<String, Usage> {
    /// The number right before `unit` in `line` (`"... 12 bytes smem"`, " bytes smem").
    fn number_before(line: &str, unit: &str) -> Option<u32> {
        let at = line.find(unit)?;
        let digits = line[..at].rsplit(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse().ok()
    }
    let mut usage = BTreeMap::new();
    // The kernel whose report the lines are, when it is one for EMULATED_ARCH.
    let mut current: Option<String> = None;
    // C7520 lines name their kernel and come before its report.
    let mut serialized = Vec::new();
    for line in log.lines() {
        if line.contains("(C7520)") {
            // "... are serialized due to REASON in the function 'NAME'"
            if let Some((head, rest)) = line.split_once(" in the function '") {
                let why = head.split_once("serialized due to ").map_or(head, |(_, why)| why);
                serialized.push((rest.split('\'').next().unwrap_or_default().to_string(), why.to_string()));
            }
            continue;
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut quoted = rest.split('\'');
            let name = quoted.next().unwrap_or_default().to_string();
            current = (quoted.nth(1) == Some(EMULATED_ARCH)).then_some(name);
            if let Some(name) = &current {
                usage.insert(name.clone(), Usage::default());
            }
            continue;
        }
        let Some(u) = current.as_ref().and_then(|name| usage.get_mut(name)) else { continue };
        if line.contains("bytes spill stores") {
            u.spill_bytes = number_before(line, " bytes spill stores").unwrap_or(0)
                + number_before(line, " bytes spill loads").unwrap_or(0);
        } else if let Some(registers) = number_before(line, " registers") {
            u.registers = registers;
            u.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    for (name, why) in serialized {
        if let Some(u) = usage.get_mut(&name) {
            u.wgmma_serialized = Some(why);
        }
    }
    usage
}

/// Builds the emulator's three libraries and its self-test into `out`; returns `out`.
/// Each kernel's launch limits are those `usage` gives for [`EMULATED_ARCH`].
fn build_emulator(
    src: &Path,
    kernels_dir: &Path,
    cu_files: &[PathBuf],
    usage: &BTreeMap<String, Usage>,
    out: &Path,
) -> Result<PathBuf, String> {
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    // One unit: the kernels, then the table of their names for cuModuleGetFunction.
    let mut unit =
        String::from("// Generated by build.rs: kernels/*.cu for the CPU emulator.\n#include \"simt.hpp\"\n");
    let mut table = String::new();
    for file in cu_files {
        let text = fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        writeln!(unit, "#include \"{}\"", file.display()).unwrap();
        for (name, bound) in kernel_entries(&text) {
            let u = usage.get(&name).ok_or_else(|| {
                format!("ptxas reported no registers for kernel {name} on {EMULATED_ARCH} (nvcc --resource-usage)")
            })?;
            writeln!(
                table,
                "    make_kernel(\"{name}\", &{name}, {bound}, {}, {}),",
                u.registers, u.shared_bytes
            )
            .unwrap();
        }
    }
    write!(
        unit,
        "namespace tl_emu {{\nconst Kernel kernel_table[] = {{\n{table}}};\n\
         const size_t kernel_count = sizeof kernel_table / sizeof kernel_table[0];\n}}\n"
    )
    .unwrap();
    let unit_path = out.join("kernels_emu.cpp");
    fs::write(&unit_path, unit).map_err(|e| format!("cannot write {}: {e}", unit_path.display()))?;

    let cxx = env::var_os("CXX").filter(|v| !v.is_empty()).unwrap_or_else(|| "c++".into());
    // The three libraries, and the cuBLASLt stand-in's self-test (an executable).
    let libs: [(&str, Vec<PathBuf>, &[&str]); 4] = [
        ("libcuda.so", vec![src.join("driver.cpp"), src.join("simt.cpp"), unit_path], &["-shared", "-fPIC"]),
        ("libcublasLt.so", vec![src.join("cublaslt.cpp")], &["-shared", "-fPIC"]),
        ("libnccl.so", vec![src.join("nccl.cpp")], &["-shared", "-fPIC"]),
        ("selftest_blaslt", vec![src.join("selftest_blaslt.cpp")], &[]),
    ];
    for (lib, files, kind) in libs {
        let mut cmd = Command::new(&cxx);
        cmd.args(["-std=c++17", "-O2", "-g", "-fvisibility=hidden", "-pthread"])
            .args(kind)
            .args(["-Wall", "-Wextra", "-Wno-unknown-pragmas"])
            .arg("-I")
            .arg(src.join("include"))
            .arg("-I")
            .arg(src)
            .arg("-I")
            .arg(kernels_dir)
            .arg("-o")
            .arg(out.join(lib))
            .args(&files)
            .arg("-ldl");
        let output = cmd.output().map_err(|e| format!("cannot run {cxx:?}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{lib}: {cmd:?} failed ({})\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        for line in String::from_utf8_lossy(&output.stderr).lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo::warning=emulator {lib}: {line}");
        }
    }
    Ok(out.to_path_buf())
}

struct KernelFiles {
    /// `.cu` files, sorted: the units of the fatbin.
    cu: Vec<PathBuf>,
    /// `.cu` and `.cuh` files: what a rebuild depends on.
    all: Vec<PathBuf>,
}

fn kernel_files(dir: &Path) -> KernelFiles {
    let mut files = KernelFiles { cu: Vec::new(), all: Vec::new() };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return files,
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    for entry in entries {
        let path = entry.expect("read kernels/ entry").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                files.cu.push(path.clone());
                files.all.push(path);
            }
            Some("cuh") => files.all.push(path),
            _ => {}
        }
    }
    files.cu.sort();
    files.all.sort();
    files
}

/// One generated `.cu` that includes every kernel file, so one nvcc run makes one fatbin
/// and helpers from `common.cuh` are compiled once.
fn translation_unit(cu_files: &[PathBuf]) -> String {
    let mut unit = String::from("// Generated by build.rs: every kernels/*.cu, in name order.\n");
    for file in cu_files {
        let path = file.to_str().expect("kernel path is not UTF-8");
        assert!(!path.contains(['"', '\n']), "unusable kernel path: {path:?}");
        writeln!(unit, "#include \"{path}\"").unwrap();
    }
    unit
}

/// `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH`, with symlinks resolved:
/// nvcc finds its `nvcc.profile`, and through it the headers and `cicc`, next to the
/// path it was started by, so a symlink to it (say `~/bin/nvcc` pointing into the PyPI
/// wheel's `nvidia/cu13/bin/`) fails with "cuda_runtime.h: No such file or directory".
fn find_nvcc() -> Option<PathBuf> {
    let nvcc = find_nvcc_unresolved()?;
    Some(fs::canonicalize(&nvcc).unwrap_or(nvcc))
}

fn find_nvcc_unresolved() -> Option<PathBuf> {
    if let Some(var) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&var);
        // A bare name (NVCC=nvcc-13.0) is looked up on PATH, like a shell would.
        let nvcc = if path.components().count() == 1 {
            on_path(&var)
        } else {
            Some(path).filter(|p| is_executable(p))
        };
        // Asked for by name: a wrong NVCC is a mistake to report, not a reason to look
        // elsewhere and build something else.
        let nvcc = nvcc.unwrap_or_else(|| panic!("NVCC={var:?} is not an executable file"));
        return Some(nvcc);
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if is_executable(&nvcc) {
            return Some(nvcc);
        }
    }
    on_path("nvcc")
}

fn on_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name.as_ref())).find(|file| is_executable(file))
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Compiles the fatbin; returns what ptxas reported of each kernel's resources on
/// [`EMULATED_ARCH`].
fn compile(nvcc: &Path, kernels_dir: &Path, unit: &Path, fatbin: &Path) -> BTreeMap<String, Usage> {
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS).arg("-I").arg(kernels_dir).arg("-o").arg(fatbin).arg(unit);
    let started = Instant::now();
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed to compile the CUDA kernels ({}).\ncommand: {cmd:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    // nvcc's warnings are worth seeing: a warning in a kernel is usually a bug. ptxas's
    // resource report (its "info" lines and their indented continuations) is read instead.
    let log = String::from_utf8_lossy(&output.stderr);
    for line in log.lines() {
        let report = line.starts_with("ptxas info") || line.starts_with(char::is_whitespace);
        if !line.trim().is_empty() && !report {
            println!("cargo::warning=nvcc: {line}");
        }
    }
    let size = fs::metadata(fatbin).map(|m| m.len()).unwrap_or(0);
    assert!(size > 0, "nvcc succeeded but wrote no fatbin at {}", fatbin.display());
    // Visible with `cargo build -vv`.
    println!(
        "built {} ({size} bytes) with {} in {:.1}s",
        fatbin.display(),
        nvcc.display(),
        started.elapsed().as_secs_f64()
    );
    resource_usage(&log)
}
