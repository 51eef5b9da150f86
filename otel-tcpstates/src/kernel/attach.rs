//! What attaching a program leaves, and attaching a tracepoint program once its
//! record is known to have the layout the program reads: shared by the loader
//! and the optional program sets (incidents, TLS), so none of them needs another.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{Ebpf, programs::TracePoint};

use crate::kernel::preflight::{self, TRACEFS};

/// An attachment: dropping it detaches the program.
pub(super) type Link = Box<dyn Send>;

/// Attaches `program` to `category:name` after checking that the tracepoint
/// exists and its format file has `layout`'s fields (name, offset, size).
pub(super) fn tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
    layout: &[(&str, usize, usize)],
    links: &mut Vec<Link>,
) -> Result<()> {
    let format_path = Path::new(TRACEFS).join(format!("events/{category}/{name}/format"));
    let format = fs::read_to_string(&format_path)
        .with_context(|| format!("this kernel has no tracepoint {category}:{name}"))?;
    preflight::check_fields(&format!("{category}:{name}"), &format, layout)?;
    let program: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
        .try_into()?;
    program.load().context("the kernel verifier rejected it")?;
    let id = program.attach(category, name)?;
    links.push(Box::new(program.take_link(id)?));
    Ok(())
}
