//! The start path's layout: which code and read-only data `vmm` touches from exec to its exit on
//! the tiny guest, as a linker script that gathers them into output sections of their own
//! (`vmm/startup-text.ld`).
//!
//! Why: the kernel maps a binary's pages with fault-around, 64 KiB around every first touch of a
//! page. A start-up that runs a few hundred functions spread over the whole text, reading
//! constants spread over the whole of `.rodata`, makes almost all of both resident; the same
//! functions and constants side by side fill a few 64 KiB blocks. `vmm-startup-layout` traces
//! them (single-stepping every thread of a run, decoding each instruction's memory operands) and
//! this module turns the input sections that hold them, read from the linker's map file (LLD's
//! format), into patterns:
//!
//! - a Rust function's section (`.text.<mangled>`, `.text.unlikely.<mangled>`, its switch tables
//!   in `.rodata..Lswitch.table.<mangled>`) with the parts of its name that change between
//!   toolchains and dependency versions wildcarded (the legacy mangling's hash, v0 crate
//!   disambiguators and back-references, ThinLTO's `.llvm.N` suffix), if the pattern still
//!   matches that section alone; a generic function's instances differ only in their hash, so
//!   those keep their exact name;
//! - Rust's anonymous constants (`.rodata..Lanon.<hash>.<n>`, numbered per codegen unit): all of
//!   their crate's, except the standard library's where the start reads few of them: those, each
//!   by its name, which changes only with the toolchain;
//! - the strings and constants the linker merges (`.rodata.str1.1`, `.rodata.cst16`): all of them;
//! - a C archive member's section (glibc's `libc.a`, built without per-function sections) as
//!   `*libc.a:member.o(.text)`; a lone object's (`rcrt1.o`) by its file name.
//!
//! A pattern that no longer matches after a change costs only that section's place: the linker
//! leaves it where it was.

use std::collections::{BTreeSet, HashMap};

/// One input section of the map: where the linker put it and what it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSection {
    pub address: u64,
    pub size: u64,
    /// The object file, `/path/libc.a(member.o)` for an archive member.
    pub file: String,
    /// The section's name in that file, `.text._ZN3vmm4main17h0123456789abcdefE`.
    pub section: String,
}

/// The input sections of an LLD map file (`-Map`), in address order.
///
/// Each line is `VMA LMA Size Align` then an output section, an input section
/// (`file:(section)`, indented once more) or a symbol (indented twice); only input sections with
/// a size are kept.
pub fn parse_lld_map(map: &str) -> Vec<InputSection> {
    let mut sections = Vec::new();
    for line in map.lines() {
        let mut fields = line.split_whitespace();
        let (Some(vma), Some(_lma), Some(size), Some(_align)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(address), Ok(size)) = (u64::from_str_radix(vma, 16), u64::from_str_radix(size, 16))
        else {
            continue;
        };
        let rest: Vec<&str> = fields.collect();
        let name = rest.join(" ");
        let Some(open) = name.rfind(":(") else {
            continue;
        };
        if size == 0 || !name.ends_with(')') {
            continue;
        }
        sections.push(InputSection {
            address,
            size,
            file: name[..open].to_string(),
            section: name[open + 2..name.len() - 1].to_string(),
        });
    }
    sections.sort_by_key(|s| s.address);
    sections
}

/// The index of the input section holding `address`, if any.
fn section_index_at(sections: &[InputSection], address: u64) -> Option<usize> {
    let index = sections
        .partition_point(|s| s.address <= address)
        .checked_sub(1)?;
    let candidate = &sections[index];
    (address < candidate.address + candidate.size).then_some(index)
}

/// `name` without ThinLTO's `.llvm.<digits>` suffix (a hash of the promoted local's module), and
/// whether it had one.
fn split_lto_suffix(name: &str) -> (&str, bool) {
    match name.rfind(".llvm.") {
        Some(at) if at + 6 < name.len() && name[at + 6..].bytes().all(|b| b.is_ascii_digit()) => {
            (&name[..at], true)
        }
        _ => (name, false),
    }
}

/// `name` with only ThinLTO's module suffix wildcarded.
pub fn wildcard_lto_suffix(name: &str) -> String {
    match split_lto_suffix(name) {
        (base, true) => format!("{base}.llvm.*"),
        (base, false) => base.to_string(),
    }
}

/// `name` with the parts that differ between builds of the same source replaced by `*`.
pub fn wildcard_symbol(name: &str) -> String {
    let (base, has_lto) = split_lto_suffix(name);
    let lto = if has_lto { ".llvm.*" } else { "" };
    let wild = if base.starts_with("_ZN") {
        wildcard_legacy_hash(base)
    } else if base.starts_with("_R") {
        wildcard_v0(base)
    } else {
        base.to_string()
    };
    format!("{wild}{lto}")
}

/// The legacy mangling's `17h<16 hex digits>E` hash: `17h*E`.
fn wildcard_legacy_hash(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < bytes.len() {
        let is_hash = bytes[i..].starts_with(b"17h")
            && bytes.len() >= i + 20
            && bytes[i + 3..i + 19].iter().all(u8::is_ascii_hexdigit)
            && bytes[i + 19] == b'E';
        if is_hash {
            out.push_str("17h*E");
            i += 20;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// The v0 mangling's crate disambiguators (`Cs<base62>_`) and back-references (`B<base62>_`,
/// offsets into the name that move when a disambiguator's length does): `Cs*_`, `B*_`. The same
/// letters inside an identifier may be wildcarded too: that only widens the pattern, and
/// `pattern_for` keeps a pattern only if it still matches one section.
fn wildcard_v0(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < bytes.len() {
        let (tag_len, marker) = if bytes[i..].starts_with(b"Cs") {
            (2, "Cs*_")
        } else if bytes[i] == b'B' && i > 0 && !bytes[i - 1].is_ascii_digit() {
            (1, "B*_")
        } else {
            (0, "")
        };
        if tag_len > 0 {
            let digits = bytes[i + tag_len..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            if bytes.get(i + tag_len + digits) == Some(&b'_') {
                out.push_str(marker);
                i += tag_len + digits + 1;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// A glob with `*` only, as the linker matches section names.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// One input section description of the script: the files it takes sections from, and which of
/// their sections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    files: FilePattern,
    sections: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FilePattern {
    /// Any file (`*`).
    Any,
    /// Files whose path matches the glob.
    Path(String),
    /// A member of archives whose path matches the glob (`*libc.a:member.o`).
    Member { archive: String, member: String },
}

impl Pattern {
    fn any_file(sections: &[&str]) -> Self {
        Pattern {
            files: FilePattern::Any,
            sections: sections.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Whether this is the pattern for all the anonymous constants of a crate of the standard
    /// library (built with the toolchain, so their names change only with it).
    fn standard_library_constants(&self) -> bool {
        const STANDARD_LIBRARY: [&str; 4] = ["core", "alloc", "std", "compiler_builtins"];
        matches!(&self.files, FilePattern::Path(glob)
            if STANDARD_LIBRARY.iter().any(|c| glob == &format!("*.{c}.*-cgu.*")))
    }

    /// Whether the linker would put `section` here.
    pub fn matches(&self, section: &InputSection) -> bool {
        let file = match &self.files {
            FilePattern::Any => true,
            FilePattern::Path(glob) => glob_matches(glob, &section.file),
            FilePattern::Member { archive, member } => match section.file.rsplit_once('(') {
                Some((path, rest)) => {
                    glob_matches(archive, path) && rest.strip_suffix(')') == Some(member)
                }
                None => false,
            },
        };
        file && self
            .sections
            .iter()
            .any(|glob| glob_matches(glob, &section.section))
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.files {
            FilePattern::Any => write!(f, "*")?,
            FilePattern::Path(glob) => write!(f, "{glob}")?,
            FilePattern::Member { archive, member } => write!(f, "{archive}:{member}")?,
        }
        write!(f, "({})", self.sections.join(" "))
    }
}

/// The pattern that names `section`, or `None` for one that is neither code nor read-only data,
/// or a section the linker makes itself other than merged constants.
pub fn pattern_for(section: &InputSection, all_names: &BTreeSet<&str>) -> Option<Pattern> {
    let name = &section.section;
    if section.file.starts_with('<') {
        // What the linker makes itself: strings and constants of one size merged from every file
        // that has them, and a static binary's stubs for calls to glibc's CPU-specific functions
        // (memcpy and the like: most of the start calls them).
        let merged = name.starts_with(".rodata.str") || name.starts_with(".rodata.cst");
        return (merged || name == ".iplt").then(|| Pattern::any_file(&[name]));
    }
    let family = [".text", ".rodata"]
        .into_iter()
        .find(|f| name == f || name.starts_with(&format!("{f}.")))?;
    let rest = name[family.len()..].strip_prefix('.').unwrap_or("");
    // Rust's anonymous constants are numbered per codegen unit: any change to a crate renumbers
    // them, so the pattern takes all of the crate's.
    if rest.starts_with(".Lanon.") || rest.starts_with("anon.") {
        if let Some(krate) = rust_crate(&section.file) {
            return Some(Pattern {
                files: FilePattern::Path(format!("*.{krate}.*-cgu.*")),
                sections: vec![".rodata..Lanon.*".into(), ".rodata.anon.*".into()],
            });
        }
    }
    // `<family>.<symbol>` or `<family>.<prefix><symbol>`: cold and hot code, a function's
    // switch tables.
    let symbol = ["unlikely.", "hot.", "startup.", "exit.", ".Lswitch.table."]
        .iter()
        .find_map(|prefix| rest.strip_prefix(prefix))
        .unwrap_or(rest);
    if symbol.starts_with("_ZN") || symbol.starts_with("_R") {
        let prefix = &name[..name.len() - symbol.len()];
        // The widest pattern that still names this section alone: every build-dependent part
        // wildcarded, else ThinLTO's module suffix only (it changes with any change to the
        // module, the hash only with the function's instance), else the exact name.
        let names_one = |pattern: &str| {
            all_names
                .iter()
                .filter(|n| glob_matches(pattern, n))
                .count()
                == 1
        };
        let wild = format!("{prefix}{}", wildcard_symbol(symbol));
        let module_wild = format!("{prefix}{}", wildcard_lto_suffix(symbol));
        let chosen = [&wild, &module_wild]
            .into_iter()
            .find(|p| names_one(p))
            .unwrap_or(name);
        return Some(Pattern::any_file(&[chosen]));
    }
    if !symbol.is_empty() {
        return Some(Pattern::any_file(&[name]));
    }
    // A C object's `.text` or `.rodata`: an archive member as `*libX.a:member.o`, a lone object
    // by its name.
    let files = match section.file.rsplit_once('(') {
        Some((archive, member)) if member.ends_with(')') => FilePattern::Member {
            archive: format!("*{}", archive.rsplit('/').next().unwrap_or(archive)),
            member: member[..member.len() - 1].to_string(),
        },
        _ => FilePattern::Path(format!(
            "*{}",
            section.file.rsplit('/').next().unwrap_or(&section.file)
        )),
    };
    Some(Pattern {
        files,
        sections: vec![name.clone()],
    })
}

/// The crate a Rust object file was compiled from: rustc names them
/// `<output>.<crate>.<hash>-cgu.<n>.rcgu.o`.
fn rust_crate(file: &str) -> Option<&str> {
    let before = &file[..file.find("-cgu.")?];
    let mut parts = before.rsplit('.');
    let (_hash, krate) = (parts.next()?, parts.next()?);
    let valid = !krate.is_empty()
        && krate
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    valid.then_some(krate)
}

/// The patterns for the sections that hold `addresses`: first those whose sections were mostly
/// touched, in the order first touched, then the sparse ones, densest first, and last the section
/// with the longest untouched tail. The kernel maps 64 KiB around each touched page, so an
/// untouched stretch costs nothing only at the end: a large table of which the start reads the
/// first pages (glibc's `C-ctype.o`) goes last.
fn patterns(
    sections: &[InputSection],
    all_names: &BTreeSet<&str>,
    addresses: &[u64],
    family: &str,
) -> Vec<Pattern> {
    // The pages touched in each section, by the section's index.
    let mut touched: HashMap<usize, BTreeSet<u64>> = HashMap::new();
    let mut order = Vec::new();
    for &address in addresses {
        let Some(index) = section_index_at(sections, address) else {
            continue;
        };
        if !sections[index].section.starts_with(family) && sections[index].section != ".iplt" {
            continue;
        }
        let page = (address - sections[index].address) / 4096;
        let pages = touched.entry(index).or_default();
        if pages.is_empty() {
            order.push(index);
        }
        pages.insert(page);
    }
    let mut patterns: Vec<Pattern> = Vec::new();
    for &index in &order {
        if let Some(pattern) = pattern_for(&sections[index], all_names) {
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
    }
    // A crate's anonymous constants are taken whole (a pattern that survives changes to the
    // crate), except the standard library's where the start reads few of them (a 12 KiB table of
    // `core`'s it never reads): those it reads, each by its name, which changes only with the
    // toolchain.
    let taken = measure(&patterns, sections, &touched);
    let mut refined: Vec<Pattern> = Vec::new();
    for (p, pattern) in patterns.iter().enumerate() {
        let sparse_std = pattern.standard_library_constants() && taken[p].density() < 0.5;
        let named: Vec<Pattern> = if sparse_std {
            order
                .iter()
                .filter(|&&i| pattern.matches(&sections[i]))
                .map(|&i| Pattern::any_file(&[&wildcard_symbol(&sections[i].section)]))
                .collect()
        } else {
            vec![pattern.clone()]
        };
        for pattern in named {
            if !refined.contains(&pattern) {
                refined.push(pattern);
            }
        }
    }
    let patterns = refined;
    let taken = measure(&patterns, sections, &touched);
    let mut ranked: Vec<usize> = (0..patterns.len()).collect();
    ranked.sort_by(|&a, &b| {
        let (da, db) = (taken[a].density(), taken[b].density());
        match (da >= 0.5, db >= 0.5) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            (false, false) => db.total_cmp(&da),
        }
    });
    // The single section with the longest untouched tail ends the list.
    let last = (0..patterns.len())
        .filter(|&p| taken[p].sections == 1)
        .max_by_key(|&p| taken[p].tail);
    if let Some(last) = last.filter(|&p| taken[p].tail >= 4096) {
        ranked.retain(|&p| p != last);
        ranked.push(last);
    }
    ranked.into_iter().map(|p| patterns[p].clone()).collect()
}

/// What one pattern takes from the map.
#[derive(Clone, Copy, Default)]
struct Taken {
    sections: usize,
    bytes: u64,
    /// Bytes in touched pages (at most each section's size).
    touched: u64,
    /// Untouched bytes after the last touched page of its last section.
    tail: u64,
}

impl Taken {
    fn density(&self) -> f64 {
        self.touched as f64 / self.bytes.max(1) as f64
    }
}

/// What each pattern takes, the linker giving a section to the first pattern that matches it.
fn measure(
    patterns: &[Pattern],
    sections: &[InputSection],
    touched: &HashMap<usize, BTreeSet<u64>>,
) -> Vec<Taken> {
    let mut taken = vec![Taken::default(); patterns.len()];
    for (index, section) in sections.iter().enumerate() {
        let Some(p) = patterns.iter().position(|p| p.matches(section)) else {
            continue;
        };
        let pages = touched.get(&index);
        let end = pages
            .and_then(|t| t.last())
            .map_or(0, |last| (last + 1) * 4096);
        let t = &mut taken[p];
        t.sections += 1;
        t.bytes += section.size;
        t.touched += (pages.map_or(0, |t| t.len() as u64) * 4096).min(section.size);
        t.tail = section.size.saturating_sub(end);
    }
    taken
}

/// The linker script for the sections that hold `code` (instructions run) and `data` (addresses
/// read or written), in the order first touched, one pattern per line.
pub fn linker_script(sections: &[InputSection], code: &[u64], data: &[u64]) -> String {
    let all_names: BTreeSet<&str> = sections.iter().map(|s| s.section.as_str()).collect();
    let mut script = String::from(SCRIPT_HEAD);
    for (output, family, addresses) in [(".text", ".text", code), (".rodata", ".rodata", data)] {
        script.push_str(&format!("SECTIONS {{\n  {output}.start_path : {{\n"));
        for pattern in patterns(sections, &all_names, addresses, family) {
            script.push_str(&format!("    {pattern}\n"));
        }
        script.push_str(&format!("  }}\n}} INSERT BEFORE {output};\n"));
    }
    script
}

const SCRIPT_HEAD: &str = "\
/* What `vmm` touches from exec to its exit on the tiny guest, gathered into two output sections:
   the code it runs just before .text (after .init, which the start runs too), the read-only data
   it reads just before .rodata. The kernel maps a binary's pages with fault-around, 64 KiB around
   each first touch of a page: gathered, the start path maps a few blocks instead of nearly all
   of both. Written by scripts/startup-layout from a traced run; regenerate it when the start
   path changes. A pattern that matches nothing leaves its section where it was. */
";

#[cfg(test)]
mod tests {
    use super::*;

    /// A script's patterns, one per line, in order.
    fn patterns_of(script: &str) -> Vec<&str> {
        script
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('*'))
            .collect()
    }

    const MAP: &str = "\
             VMA              LMA     Size Align Out     In      Symbol
            b80              b80    67a94    64 .rodata
            b80              b80     b638     1         <internal>:(.rodata.str1.1)
           c1c0             c1c0       14     1         /t/deps/vmm-1.vmm.99f0-cgu.0.rcgu.o:(.rodata..Lanon.3b8318f7df0123.35)
           c1d4             c1d4       38     4         /t/deps/vmm-1.arch.2fe4-cgu.1.rcgu.o:(.rodata..Lswitch.table._ZN4arch5cpuid12filter_cpuid17h0123456789abcdefE)
           c20c             c20c       80     8         /usr/lib/x86_64-linux-gnu/libc.a(vfscanf-internal.o):(.rodata)
           c28c             c28c       10     1         /t/deps/vmm-1.pvm.77a5-cgu.2.rcgu.o:(.rodata.anon.5992342ef1881f3b.3.llvm.305082)
          b2c40            b2c40  1fd9b8    64 .text
          b2c40            b2c40       22    16         /usr/lib/x86_64-linux-gnu/rcrt1.o:(.text)
          b2c40            b2c40       22     1                 _start
          b2c70            b2c70      100    16         /t/deps/vmm.vmm.a-cgu.0.rcgu.o:(.text._ZN3vmm4main17hb441a2a81a288559E)
          b2c70            b2c70      100     1                 vmm::main::hb441a2a81a288559
          b2d70            b2d70       64    16         /t/deps/vmm.clap.b-cgu.3.rcgu.o:(.text.unlikely._ZN5alloc7raw_vec19RawVec$LT$T$C$A$GT$8grow_one17h71bb2ef6cfbcc706E)
          b2de0            b2de0       64    16         /t/deps/vmm.clap.b-cgu.3.rcgu.o:(.text.unlikely._ZN5alloc7raw_vec19RawVec$LT$T$C$A$GT$8grow_one17h117a83cdba2fee2eE)
          b2e50            b2e50       40    16         /t/deps/vmm.std.c-cgu.0.rcgu.o:(.text._RNvNtNtCsjrHSEGnQ3l9_3std6thread7current12init_current.llvm.3643936799275306673)
          b2e90            b2e90     2297    16         /usr/lib/x86_64-linux-gnu/libc.a(libc-start.o):(.text)
          b2e90            b2e90       3d     1                 call_fini
          b5130            b5130       e0    16         /t/deps/compiler_builtins.o:(.text.__udivti3)
          b5210            b5210       10     1         <internal>:(.iplt)
          b5220            b5220        0     1         /t/deps/empty.o:(.text.empty)
";

    #[test]
    fn the_map_gives_each_input_section_with_its_file() {
        let sections = parse_lld_map(MAP);
        assert_eq!(sections.len(), 13, "{sections:#?}");
        assert_eq!(sections[1].file, "/t/deps/vmm-1.vmm.99f0-cgu.0.rcgu.o");
        assert_eq!(sections[1].section, ".rodata..Lanon.3b8318f7df0123.35");
        assert_eq!(
            sections[5],
            InputSection {
                address: 0xb2c40,
                size: 0x22,
                file: "/usr/lib/x86_64-linux-gnu/rcrt1.o".into(),
                section: ".text".into(),
            }
        );
        assert_eq!(
            sections[10].file,
            "/usr/lib/x86_64-linux-gnu/libc.a(libc-start.o)"
        );
        assert_eq!(
            section_index_at(&sections, 0xb2c7f).map(|i| sections[i].address),
            Some(0xb2c70)
        );
        assert_eq!(
            section_index_at(&sections, 0xb2c62),
            None,
            "past the end of one, before the next"
        );
        assert_eq!(section_index_at(&sections, 0x100), None, "before the first");
    }

    #[test]
    fn hashes_disambiguators_and_lto_suffixes_are_wildcarded() {
        assert_eq!(
            wildcard_symbol("_ZN3vmm4main17hb441a2a81a288559E"),
            "_ZN3vmm4main17h*E"
        );
        assert_eq!(
            wildcard_symbol("_ZN3std4sync4Once4call17h8dbdfda811e5927aE.llvm.13359519167772008546"),
            "_ZN3std4sync4Once4call17h*E.llvm.*"
        );
        assert_eq!(
            wildcard_symbol(
                "_RNvMs3_NtCslNYArtu3iFV_5alloc7raw_vecINtB5_6RawVecNtNtNtCsjrHSEGnQ3l9_3std3ffi6os_str8OsStringE8grow_oneBS_"
            ),
            "_RNvMs3_NtCs*_5alloc7raw_vecINtB*_6RawVecNtNtNtCs*_3std3ffi6os_str8OsStringE8grow_oneB*_"
        );
        // An identifier's length digits are not back-references: `7Builder_x` stays.
        assert_eq!(
            wildcard_symbol("_RNvCs1_4test9Builder_x"),
            "_RNvCs*_4test9Builder_x"
        );
        assert_eq!(wildcard_symbol("__udivti3"), "__udivti3");
        assert_eq!(
            wildcard_lto_suffix("_ZN3std4sync4Once4call17h8dbdfda811e5927aE.llvm.1335951916"),
            "_ZN3std4sync4Once4call17h8dbdfda811e5927aE.llvm.*"
        );
        assert_eq!(
            wildcard_lto_suffix("_ZN3vmm4main17hb441a2a81a288559E"),
            "_ZN3vmm4main17hb441a2a81a288559E"
        );
        // "17h" not followed by 16 hex digits and E is part of a name.
        assert_eq!(wildcard_symbol("_ZN4a17hello3fooE"), "_ZN4a17hello3fooE");
    }

    #[test]
    fn a_pattern_keeps_the_hash_that_tells_two_instances_apart_but_not_the_module_suffix() {
        let closure = |hash: &str, module: &str| InputSection {
            address: 0,
            size: 16,
            file: "/t/deps/vmm.vmm.a-cgu.0.rcgu.o".into(),
            section: format!(".text._ZN3std4sync4Once4call28closure17h{hash}E.llvm.{module}"),
        };
        let (a, b) = (
            closure(&"a".repeat(16), "11"),
            closure(&"b".repeat(16), "22"),
        );
        let names: BTreeSet<&str> = [a.section.as_str(), b.section.as_str()].into();
        let pattern = pattern_for(&a, &names).unwrap();
        assert_eq!(
            pattern.to_string(),
            format!(
                "*(.text._ZN3std4sync4Once4call28closure17h{}E.llvm.*)",
                "a".repeat(16)
            )
        );
        // The same function after a change elsewhere in its module: still matched.
        assert!(pattern.matches(&closure(&"a".repeat(16), "33")));
        assert!(!pattern.matches(&b));
    }

    #[test]
    fn a_pattern_takes_the_sections_the_linker_would_give_it() {
        let sections = parse_lld_map(MAP);
        let names: BTreeSet<&str> = sections.iter().map(|s| s.section.as_str()).collect();
        let libc = pattern_for(&sections[10], &names).unwrap();
        assert_eq!(libc.to_string(), "*libc.a:libc-start.o(.text)");
        let taken: Vec<&str> = sections
            .iter()
            .filter(|s| libc.matches(s))
            .map(|s| s.file.as_str())
            .collect();
        assert_eq!(taken, ["/usr/lib/x86_64-linux-gnu/libc.a(libc-start.o)"]);
        // A crate's anonymous constants, whichever codegen unit holds them; not another crate's.
        let vmm = pattern_for(&sections[1], &names).unwrap();
        let moved = InputSection {
            file: "/t/deps/vmm-1.vmm.77-cgu.3.rcgu.o".into(),
            section: ".rodata.anon.1234.7.llvm.99".into(),
            ..sections[1].clone()
        };
        assert!(vmm.matches(&moved));
        assert!(
            !vmm.matches(&sections[5]),
            "pvm's constants are pvm's pattern's"
        );
        assert!(
            !vmm.matches(&sections[2]),
            "a switch table is not an anonymous constant"
        );
        // The linker's merged strings, from any file.
        let strings = pattern_for(&sections[0], &names).unwrap();
        assert_eq!(strings.to_string(), "*(.rodata.str1.1)");
        assert!(strings.matches(&sections[0]));
    }

    #[test]
    fn a_crates_constants_go_whole_but_the_standard_librarys_by_name_where_few_are_read() {
        // Of vmm's two constants one is read; of core's, a small one is and a 12 KiB table is not.
        let map = "\
            b80              b80    67a94    64 .rodata
            b80              b80       40     1         /t/deps/x.vmm.aa-cgu.0.rcgu.o:(.rodata..Lanon.aa.1)
            bc0              bc0       40     1         /t/deps/x.vmm.aa-cgu.1.rcgu.o:(.rodata..Lanon.bb.2)
            c00              c00       20     1         /t/deps/x.core.cc-cgu.0.rcgu.o:(.rodata..Lanon.cc.7)
            c20              c20     3000     1         /t/deps/x.core.cc-cgu.0.rcgu.o:(.rodata.anon.cc.215.llvm.5844774)
";
        let sections = parse_lld_map(map);
        let script = linker_script(&sections, &[], &[0xb80, 0xc00]);
        let patterns = patterns_of(&script);
        assert_eq!(
            patterns,
            [
                "*.vmm.*-cgu.*(.rodata..Lanon.* .rodata.anon.*)",
                "*(.rodata..Lanon.cc.7)",
            ]
        );
    }

    #[test]
    fn globs_match_as_the_linker_does() {
        assert!(glob_matches("a*c", "abc"));
        assert!(glob_matches("a*c", "ac"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxcyyb"));
        assert!(!glob_matches("a*a", "a"));
        assert!(!glob_matches("abc", "abd"));
    }

    #[test]
    fn the_script_names_each_touched_section_once_by_a_pattern_that_survives_rebuilds() {
        let sections = parse_lld_map(MAP);
        // main twice, grow_one's first instance, std's init_current, libc, crt, builtins, the
        // linker's stubs.
        let code = [
            0xb2c70, 0xb2c80, 0xb2d70, 0xb2e60, 0xb2ea0, 0xb2c40, 0xb5140, 0xb5210, 0xb2c41,
        ];
        // A string, a switch table, libc's tables, two anonymous constants, and code (ignored).
        let data = [0xc00, 0xc1e0, 0xc20c, 0xc1c0, 0xc28c, 0xc1c8, 0xb2c70];
        let script = linker_script(&sections, &code, &data);
        let patterns = patterns_of(&script);
        assert_eq!(
            patterns,
            [
                "*(.text._ZN3vmm4main17h*E)",
                // Two instances of the generic differ only in their hash: the exact one.
                "*(.text.unlikely._ZN5alloc7raw_vec19RawVec$LT$T$C$A$GT$8grow_one17h71bb2ef6cfbcc706E)",
                "*(.text._RNvNtNtCs*_3std6thread7current12init_current.llvm.*)",
                "*rcrt1.o(.text)",
                "*(.text.__udivti3)",
                "*(.iplt)",
                // One page touched of 8.6 KiB: after the dense ones.
                "*libc.a:libc-start.o(.text)",
                "*(.rodata..Lswitch.table._ZN4arch5cpuid12filter_cpuid17h*E)",
                "*libc.a:vfscanf-internal.o(.rodata)",
                "*.vmm.*-cgu.*(.rodata..Lanon.* .rodata.anon.*)",
                "*.pvm.*-cgu.*(.rodata..Lanon.* .rodata.anon.*)",
                // The first string read first, but one page of 45 KiB: last.
                "*(.rodata.str1.1)",
            ]
        );
        let text = script
            .find(".text.start_path : {")
            .expect("the code's section");
        let rodata = script
            .find(".rodata.start_path : {")
            .expect("the data's section");
        assert!(text < script.find("} INSERT BEFORE .text;").unwrap());
        assert!(rodata < script.find("} INSERT BEFORE .rodata;").unwrap());
        assert!(
            script.contains("    *(.iplt)\n"),
            "the linker's stubs are code the start runs"
        );
    }
}
