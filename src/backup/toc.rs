//! A custom-format dump's header, table of contents and data blocks (what `pg_dump -Fc`
//! writes), read as `pg_restore` reads them (`ReadHead`, `ReadToc`, `pg_backup_custom.c`): the format layer of a restore's check,
//! below the judgment of what the entries may do (`dump`). What `pg_restore` would read
//! otherwise than regobox (an integer beyond a C `int`, a text holding a NUL, a dependency that
//! is not an id) is refused here, so that the entries judged are the entries `pg_restore`
//! restores.

/// Why a dump's header or table of contents is not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Its header (see [`read_header`]).
    Header(String),
    /// Its table of contents.
    Unreadable(String),
    /// Its data (see [`Toc::read_data`]).
    Data(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Header(why) => write!(f, "its header {why}"),
            ReadError::Unreadable(why) => write!(f, "its table of contents {why}"),
            ReadError::Data(why) => write!(f, "its data {why}"),
        }
    }
}

/// The longest a named refusal is in a message.
pub const NAMED_LEN: usize = 300;

/// The longest text a dump's header holds that regobox reads (its database's name, the server's
/// and pg_dump's versions: a few dozen bytes).
const HEADER_TEXT_MAX: i64 = 1024;

/// What a dump's header says of the rest: the minor version of its format (1.10 to 1.16), on
/// which the fields of each entry of its table of contents depend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub minor: u8,
    /// The header's length: where the table of contents begins.
    pub header_len: u64,
}

/// Read the header of a custom-format dump (what `pg_dump -Fc` writes: `PGDMP`, its format's
/// version, the sizes of its integers and offsets, its compression, when it was made, its
/// database's name and the versions of the server and of pg_dump), as `pg_restore` reads it
/// (`ReadHead`), and judge the texts: `pg_restore` prints them as they are in the SQL it runs (a
/// second attacker's, twenty-eighth session: a version holding a line break put a statement
/// of its own into the SQL the load ran). Each must be at most 1 KiB of UTF-8 without a control
/// character. Integers of 4 bytes and offsets of 8, as pg_dump writes them (`pg_restore` reads
/// a wider integer into 4 bytes, shifting past their width). What is wrong, for a message,
/// otherwise; `r` is read no further than the texts' end, where the table of contents begins.
pub fn read_header(r: &mut impl std::io::Read) -> Result<Format, String> {
    let mut h = Fields {
        r,
        read: 0,
        max: u64::MAX,
    };
    let mut magic = [0u8; 5];
    for m in &mut magic {
        *m = h.byte("format's name")?;
    }
    if &magic != b"PGDMP" {
        return Err("is not a custom-format dump's (`PGDMP`)".into());
    }
    let version = (h.byte("version")?, h.byte("version")?, h.byte("version")?);
    let int_size = h.byte("integers' size")?;
    let offset_size = h.byte("offsets' size")?;
    let format = h.byte("format")?;
    // pg_dump writes 1.10 (PostgreSQL 9.0) to 1.16 (PostgreSQL 17), custom format (1).
    if version.0 != 1 || !(10..=16).contains(&version.1) || format != 1 {
        return Err(format!(
            "says format {} version {}.{}.{}, not the custom format of a dump regobox restores",
            format, version.0, version.1, version.2
        ));
    }
    if int_size != 4 || offset_size != 8 {
        return Err(format!(
            "says integers of {int_size} bytes and offsets of {offset_size}, not the 4 and 8 pg_dump writes"
        ));
    }
    // regobox's dumps are not compressed (`--compress=0`: the archive is): a compressed one is
    // not regobox's (an attacker's, twenty-ninth session: a zlib stream followed by 4 bytes made
    // `pg_restore` read it forever, the services stopped).
    let compression = if version.1 >= 15 {
        i32::from(h.byte("compression")?)
    } else {
        h.int("compression")?
    };
    if compression != 0 {
        return Err(format!(
            "says its data is compressed ({compression}); regobox's dumps are not"
        ));
    }
    for _ in 0..7 {
        h.int("date")?;
    }
    for what in ["database's name", "server's version", "pg_dump's version"] {
        let Some(text) = h.text(what, HEADER_TEXT_MAX as usize)? else {
            continue;
        };
        if text.chars().any(char::is_control) {
            return Err(format!(
                "has a {what} holding a control character: {}",
                shortened(&format!("{text:?}"))
            ));
        }
    }
    Ok(Format {
        minor: version.1,
        header_len: h.read,
    })
}

/// The article before `what`.
fn a(what: &str) -> &'static str {
    if what.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A dump's header and table of contents, field by field, as `pg_restore` reads them (a sign
/// byte and 4 bytes an integer, least first; a text its length then its bytes, -1 for none);
/// what was read, counted, up to `max` bytes.
struct Fields<'a, R> {
    r: &'a mut R,
    read: u64,
    max: u64,
}

impl<R: std::io::Read> Fields<'_, R> {
    /// A byte, or `None` at the end.
    fn byte_or_end(&mut self, what: &str) -> Result<Option<u8>, String> {
        let mut b = [0u8; 1];
        match self.r.read(&mut b) {
            Ok(0) => Ok(None),
            Ok(_) => {
                self.read += 1;
                Ok(Some(b[0]))
            }
            Err(e) => Err(format!("cannot be read ({what}): {e}")),
        }
    }

    fn byte(&mut self, what: &str) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("ends before its {what}"))?;
        self.read += 1;
        Ok(b[0])
    }

    /// An integer: a sign byte (0 or 1), then 4 bytes. `pg_restore` reads it into a C `int`:
    /// one beyond that is refused, not read as it would wrap.
    fn int(&mut self, what: &str) -> Result<i32, String> {
        let sign = self.byte(what)?;
        let mut v = [0u8; 4];
        for b in &mut v {
            *b = self.byte(what)?;
        }
        let v = i32::try_from(u32::from_le_bytes(v))
            .map_err(|_| format!("holds an integer too large ({what})"))?;
        match sign {
            0 => Ok(v),
            1 => Ok(-v),
            _ => Err(format!("holds an integer of sign {sign} ({what})")),
        }
    }

    /// A text's length: `None` for none (-1). One that would take the whole past its bound
    /// is refused before it is read.
    fn len(&mut self, what: &str) -> Result<Option<usize>, String> {
        match self.int(what)? {
            -1 => Ok(None),
            n if n < 0 => Err(format!("holds a text of length {n} ({what})")),
            n if self.read.saturating_add(n as u64) > self.max => {
                Err(format!("is longer than {} MiB", self.max >> 20))
            }
            n => Ok(Some(n as usize)),
        }
    }

    /// A text regobox reads: at most `max` bytes of UTF-8 without a NUL (`pg_restore` reads a
    /// text up to its first NUL: what follows one would be read by regobox alone).
    fn text(&mut self, what: &str, max: usize) -> Result<Option<String>, String> {
        let Some(len) = self.len(what)? else {
            return Ok(None);
        };
        if len > max {
            return Err(format!("has {} {what} of {len} bytes", a(what)));
        }
        let mut text = vec![0u8; len];
        self.r
            .read_exact(&mut text)
            .map_err(|_| format!("ends before its {what}"))?;
        self.read += len as u64;
        if text.contains(&0) {
            return Err(format!("has {} {what} holding a NUL", a(what)));
        }
        String::from_utf8(text)
            .map(Some)
            .map_err(|_| format!("has {} {what} that is not UTF-8", a(what)))
    }

    /// A text regobox does not read, passed over; whether there was one.
    fn skip(&mut self, what: &str) -> Result<bool, String> {
        let Some(len) = self.len(what)? else {
            return Ok(false);
        };
        let skipped = std::io::copy(
            &mut std::io::Read::take(&mut *self.r, len as u64),
            &mut std::io::sink(),
        )
        .map_err(|e| format!("cannot be read: {e}"))?;
        if skipped < len as u64 {
            return Err(format!("ends before its {what}"));
        }
        self.read += skipped;
        Ok(true)
    }
}

/// An entry of a dump's table of contents, as regobox reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's dump id (what `--use-list` selects by).
    pub id: u32,
    /// What it is (`TABLE`, `SCHEMA`, ...: pg_dump's `desc`).
    pub kind: String,
    /// Its schema, `-` for none (as `pg_restore --list` prints it).
    pub schema: String,
    /// The object's name (its `tag`: `f(integer, text)`, `EXTENSION "uuid-ossp"` for a comment).
    pub name: String,
    /// Its owner, empty for none.
    pub owner: String,
    /// Its definition, for the kinds regobox reads one of ([`DEFINED`]).
    pub definition: Option<String>,
}

impl Entry {
    /// `kind schema.name`, for a person.
    pub fn describe(&self) -> String {
        if self.schema.is_empty() || self.schema == "-" {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}.{}", self.kind, self.schema, self.name)
        }
    }

    /// The line of a `--use-list` that selects it: its id alone (`pg_restore` reads the number
    /// at the start of a line and nothing after it).
    pub fn listed(&self) -> String {
        format!("{}\n", self.id)
    }
}

/// The kinds of entry whose definition regobox reads: the schemas and extensions it makes
/// itself, and what `pg_restore` applies to every connection whatever its list selects.
const DEFINED: &[&str] = &[
    "SCHEMA",
    "EXTENSION",
    "ENCODING",
    "STDSTRINGS",
    "SEARCHPATH",
];

/// The longest text of an entry regobox reads (its kind, schema, name, owner, the definitions
/// of [`DEFINED`]): a name is at most 63 bytes, a function's with its argument types a few KiB.
/// A crafted dump's entry of a 700 MiB name, 24 KB compressed, made a restore's check hold 4 GB.
pub const MAX_TOC_TEXT: usize = 64 << 10;

/// The most of a table of contents read (`pg_restore` holds all of it, definitions included,
/// within the 2 GiB a restore gives it).
pub const MAX_TOC: u64 = 1 << 30;

/// The most entries a table of contents may hold (a database of 100 000 tables, their
/// indexes, constraints and grants, is about 500 000). `pg_restore` holds every entry: a
/// million of them took it 534 MB, four million past the 2 GiB a restore gives it (an
/// attacker's, twenty-ninth session: a 6.6 MB archive).
pub const MAX_ENTRIES: i32 = 1_000_000;

/// A dump's table of contents read entry by entry, as `pg_restore` reads it (`ReadToc`, and
/// the custom format's offset of each entry's data), after its header.
pub struct Toc<'a, R> {
    fields: Fields<'a, R>,
    format: Format,
    left: i32,
    number: i32,
    /// The highest id of an entry, and of a dependency, read so far.
    max_id: i32,
    max_dependency: i32,
    /// The entries with data: their ids, and where their data is if the table says.
    data: std::collections::HashMap<u32, Option<u64>>,
}

impl<'a, R: std::io::Read> Toc<'a, R> {
    /// The table of contents of the dump `r` begins with: its header read ([`read_header`]).
    pub fn read(r: &'a mut R, max: u64) -> Result<Self, ReadError> {
        let format = read_header(&mut *r).map_err(ReadError::Header)?;
        let mut fields = Fields { r, read: 0, max };
        let count = fields
            .int("number of entries")
            .map_err(ReadError::Unreadable)?;
        if !(0..=MAX_ENTRIES).contains(&count) {
            return Err(ReadError::Unreadable(format!(
                "says it holds {count} entries (regobox reads up to {MAX_ENTRIES})"
            )));
        }
        Ok(Toc {
            fields,
            format,
            left: count,
            number: 0,
            max_id: 0,
            max_dependency: 0,
            data: std::collections::HashMap::new(),
        })
    }

    /// Once every entry is read: the dump's data, read to its end as `pg_restore` reads it
    /// (`pg_backup_custom.c`: blocks of a type, 1 for a table's data or 3 for large objects,
    /// and an entry's id, each of chunks of a length then the bytes, a length of 0 ending it;
    /// large objects each an oid then chunks, an oid of 0 ending them). Each block is an entry's
    /// with data, once, where the table says it is, every such entry has one, and no length is
    /// negative (an attacker's, twenty-ninth session: a length of -5 made `pg_restore`, looking
    /// for a block, seek back over it and read it again forever, the services stopped). The data
    /// of `bounded`'s entry is at most its bound of bytes (what regobox reads of it itself), and
    /// is returned (empty if the entry has no block).
    pub fn read_data(&mut self, bounded: Option<(u32, u64)>) -> Result<Vec<u8>, ReadError> {
        let start = self.format.header_len;
        let f = &mut self.fields;
        f.max = u64::MAX;
        let unreadable = ReadError::Data;
        let mut seen = std::collections::HashSet::new();
        let mut kept = Vec::new();
        loop {
            let at = start + f.read;
            let Some(kind) = f.byte_or_end("a block").map_err(unreadable)? else {
                break;
            };
            let id = f.int("a block's id").map_err(unreadable)?;
            let id = u32::try_from(id).unwrap_or(0);
            let Some(placed) = self.data.get(&id) else {
                return Err(unreadable(format!(
                    "has a block of id {id}, which is no entry's with data"
                )));
            };
            if placed.is_some_and(|p| p != at) {
                return Err(unreadable(format!(
                    "has the block of id {id} elsewhere than its entry says"
                )));
            }
            if !seen.insert(id) {
                return Err(unreadable(format!("has two blocks of id {id}")));
            }
            let mut size = 0u64;
            // The bounded entry's bytes are kept, up to its bound.
            let keep = bounded.filter(|(b, _)| *b == id).map(|(_, max)| max);
            let mut chunks = |f: &mut Fields<'_, R>| -> Result<(), String> {
                loop {
                    match f.int("a chunk's length")? {
                        0 => return Ok(()),
                        n if n < 0 => return Err(format!("has a chunk of length {n}")),
                        n => {
                            size += n as u64;
                            let mut chunk = std::io::Read::take(&mut *f.r, n as u64);
                            let skipped = match keep {
                                Some(max) if size <= max => std::io::copy(&mut chunk, &mut kept),
                                _ => std::io::copy(&mut chunk, &mut std::io::sink()),
                            }
                            .map_err(|e| format!("cannot be read: {e}"))?;
                            if skipped < n as u64 {
                                return Err("ends inside a chunk".into());
                            }
                            f.read += skipped;
                        }
                    }
                }
            };
            match kind {
                1 => chunks(f).map_err(unreadable)?,
                3 => loop {
                    match f.int("a large object's oid").map_err(unreadable)? {
                        0 => break,
                        oid if oid < 0 => {
                            return Err(unreadable(format!("has a large object of oid {oid}")));
                        }
                        _ => chunks(f).map_err(unreadable)?,
                    }
                },
                _ => return Err(unreadable(format!("has a block of type {kind}"))),
            }
            if let Some((bounded, max)) = bounded {
                if bounded == id && size > max {
                    return Err(unreadable(format!(
                        "has {size} bytes of data for entry {id}, where regobox reads at most {max}"
                    )));
                }
            }
        }
        if let Some(id) = self.data.keys().find(|id| !seen.contains(*id)) {
            return Err(unreadable(format!(
                "has no block for entry {id}, which has data"
            )));
        }
        Ok(kept)
    }

    /// What the header says of the rest.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Once every entry is read: each dependency names an id within the table's (`pg_restore`
    /// looks a dependency up in an array of the ids, bounded above only: an attacker's,
    /// twenty-ninth session, a dependency of -1 made its parallel load write outside the array,
    /// as root, after the services had stopped).
    pub fn dependencies_within(&self) -> Result<(), ReadError> {
        if self.max_dependency > self.max_id {
            return Err(ReadError::Unreadable(format!(
                "has a dependency on id {}, beyond its highest entry's ({})",
                self.max_dependency, self.max_id
            )));
        }
        Ok(())
    }

    /// The next entry; `None` after the last.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.number += 1;
        let number = self.number;
        let entry = self
            .entry()
            .map_err(|why| ReadError::Unreadable(format!("{why} (entry {number})")))?;
        Ok(Some(entry))
    }

    fn entry(&mut self) -> Result<Entry, String> {
        let minor = self.format.minor;
        let f = &mut self.fields;
        let id = f.int("id")?;
        if id <= 0 {
            return Err(format!("has an entry of id {id}"));
        }
        self.max_id = self.max_id.max(id);
        // Whether it has data, as pg_dump writes it (`pg_restore` takes any other number for
        // yes, and an attacker's -1 had a definition run twice by its parallel load).
        let had_data = f.int("data flag")?;
        if !(0..=1).contains(&had_data) {
            return Err(format!("has an entry of data flag {had_data}"));
        }
        for what in ["catalog's oid", "oid"] {
            if !f.skip(what)? {
                return Err(format!("has an entry without its {what}"));
            }
        }
        let text = |f: &mut Fields<'_, R>, what: &str| {
            f.text(what, MAX_TOC_TEXT).map(Option::unwrap_or_default)
        };
        // `pg_restore` compares both with its own (none would crash it).
        let name = f
            .text("name", MAX_TOC_TEXT)?
            .ok_or("has an entry without its name")?;
        let kind = f
            .text("kind", MAX_TOC_TEXT)?
            .ok_or("has an entry without its kind")?;
        if minor >= 11 {
            // SECTION_NONE to SECTION_POST_DATA.
            let section = f.int("section")?;
            if !(1..=4).contains(&section) {
                return Err(format!("has an entry of section {section}"));
            }
        }
        let definition = if DEFINED.contains(&kind.as_str()) {
            f.text("definition", MAX_TOC_TEXT)?
        } else {
            f.skip("definition")?;
            None
        };
        f.skip("drop statement")?;
        f.skip("copy statement")?;
        let schema = text(f, "schema")?;
        // Set by `pg_restore` before the entry's definition runs: pg_dump's default tablespace
        // (none: a regobox cluster has no other), a table's default access method (an
        // attacker's unknown one failed the load after the stop).
        if !f
            .text("tablespace", MAX_TOC_TEXT)?
            .unwrap_or_default()
            .is_empty()
        {
            return Err("has an entry in a tablespace of its own".into());
        }
        if minor >= 14 {
            let method = f.text("table access method", MAX_TOC_TEXT)?;
            // (None for what is not a table; an empty one is set as `""`, which fails.)
            match method.as_deref() {
                None | Some("heap") => {}
                Some("") => {
                    return Err(
                        "has a table of an empty access method (regobox restores heap tables)"
                            .into(),
                    );
                }
                Some(other) => {
                    return Err(format!(
                        "has a table of access method {} (regobox restores heap tables)",
                        shortened(other)
                    ));
                }
            }
        }
        if minor >= 16 {
            f.int("relation kind")?;
        }
        let owner = text(f, "owner")?;
        // `pg_restore` compares it with `true`: none would crash it.
        if !f.skip("WITH OIDS")? {
            return Err("has an entry without its WITH OIDS".into());
        }
        // Dependencies: ids (`pg_restore` reads each with `sscanf`, a number or garbage).
        while let Some(dependency) = f.text("dependency", 10)? {
            let id = (!dependency.is_empty() && dependency.bytes().all(|b| b.is_ascii_digit()))
                .then(|| dependency.parse::<i32>().ok())
                .flatten()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    format!(
                        "has a dependency {} (not an id)",
                        shortened(&format!("{dependency:?}"))
                    )
                })?;
            self.max_dependency = self.max_dependency.max(id);
        }
        // The custom format's offset of the entry's data: a flag (not set, set, no data), then
        // the offset.
        // Not set (1) or set (2) for an entry with data, none (3) for one without.
        let flag = f.byte("data offset")?;
        let expected = if had_data == 1 { 1..=2 } else { 3..=3 };
        if !expected.contains(&flag) {
            return Err(format!(
                "has a data offset flag {flag} for an entry of data flag {had_data}"
            ));
        }
        let mut offset = [0u8; 8];
        for b in &mut offset {
            *b = f.byte("data offset")?;
        }
        if had_data == 1 {
            let placed = (flag == 2).then(|| u64::from_le_bytes(offset));
            self.data.insert(id as u32, placed);
        }
        Ok(Entry {
            id: id as u32,
            kind,
            schema: if schema.is_empty() {
                "-".into()
            } else {
                schema
            },
            name,
            owner,
            definition,
        })
    }
}

/// `s` as a message names it (at most a few hundred bytes, its control characters escaped).
pub fn shortened(s: &str) -> String {
    shorten(s.to_string(), NAMED_LEN)
}

/// `s` with its control characters (line breaks too) escaped, as `\n` or `\u{1b}`: what a
/// message says may be an archive's (an attacker's, twenty-ninth session: an escape sequence,
/// and a line of its own in a log).
pub fn printable(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `s` cut to at most `max` bytes (on a character's boundary), `…` saying so.
pub fn shorten(s: String, max: usize) -> String {
    let mut s = printable(s);
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
pub(crate) mod write {
    //! Dumps as pg_dump writes them, and as an attacker might, for the tests.
    use super::*;

    /// An integer as pg_dump writes one (4 bytes).
    pub(crate) fn int(v: i32) -> Vec<u8> {
        let mut b = vec![u8::from(v < 0)];
        b.extend_from_slice(&v.unsigned_abs().to_le_bytes());
        b
    }

    /// A text as pg_dump writes one (`None`: -1).
    pub(crate) fn text(t: Option<&[u8]>) -> Vec<u8> {
        match t {
            None => int(-1),
            Some(t) => {
                let mut b = int(t.len() as i32);
                b.extend_from_slice(t);
                b
            }
        }
    }

    /// An entry's fields regobox reads without keeping them, as pg_dump writes them unless a
    /// test says otherwise.
    pub(crate) struct Raw<'a> {
        pub had_data: i32,
        pub tablespace: Option<&'a [u8]>,
        pub access_method: Option<&'a [u8]>,
        pub dependencies: &'a [&'a [u8]],
        pub flag: u8,
        pub offset: u64,
    }

    pub(crate) const PG_DUMP: Raw<'static> = Raw {
        had_data: 0,
        tablespace: Some(b""),
        access_method: Some(b"heap"),
        dependencies: &[b"1"],
        flag: 3,
        offset: 0,
    };

    /// An entry of a table of contents as pg_dump 1.`minor` writes one (`-` for no schema,
    /// an empty owner for none).
    pub(crate) fn entry_bytes(minor: u8, e: &Entry) -> Vec<u8> {
        entry_bytes_with(minor, e, &PG_DUMP)
    }

    pub(crate) fn entry_bytes_with(minor: u8, e: &Entry, raw: &Raw<'_>) -> Vec<u8> {
        let opt = |s: &str, none: &str| (s != none).then(|| s.as_bytes().to_vec());
        let mut b = int(e.id as i32);
        b.extend(int(raw.had_data));
        b.extend(text(Some(b"1259")));
        b.extend(text(Some(b"16386")));
        b.extend(text(Some(e.name.as_bytes())));
        b.extend(text(Some(e.kind.as_bytes())));
        if minor >= 11 {
            b.extend(int(2));
        }
        b.extend(text(e.definition.as_deref().map(str::as_bytes)));
        b.extend(text(Some(b"DROP x;\n")));
        b.extend(text(Some(b"")));
        b.extend(text(opt(&e.schema, "-").as_deref()));
        b.extend(text(raw.tablespace));
        if minor >= 14 {
            b.extend(text(raw.access_method));
        }
        if minor >= 16 {
            b.extend(int(114));
        }
        b.extend(text(opt(&e.owner, "").as_deref()));
        b.extend(text(Some(b"false")));
        for dep in raw.dependencies {
            b.extend(text(Some(dep)));
        }
        b.extend(text(None));
        b.push(raw.flag);
        b.extend_from_slice(&raw.offset.to_le_bytes());
        b
    }

    /// A dump of format 1.14 (pg_dump 15) whose table of contents holds `entries`, after its
    /// `ENCODING` entry (UTF8).
    pub(crate) fn dump_of(entries: &[Entry]) -> Vec<u8> {
        let debian = b"15.18 (Debian 15.18-0+deb12u1)".as_slice();
        let mut d = header(14, [b"app", debian, debian]);
        let encoding = Entry {
            id: 1,
            kind: "ENCODING".into(),
            schema: "-".into(),
            name: "ENCODING".into(),
            owner: String::new(),
            definition: Some("SET client_encoding = 'UTF8';\n".into()),
        };
        d.extend(int(entries.len() as i32 + 1));
        for e in std::iter::once(&encoding).chain(entries) {
            d.extend(entry_bytes(14, e));
        }
        d
    }

    /// A dump's header as pg_dump writes it (format 1.`minor`, 4-byte integers), its database's
    /// name and versions `texts`.
    pub(crate) fn header(minor: u8, texts: [&[u8]; 3]) -> Vec<u8> {
        let mut h = b"PGDMP".to_vec();
        h.extend_from_slice(&[1, minor, 0, 4, 8, 1]);
        if minor >= 15 {
            h.push(0);
        } else {
            h.extend(int(0));
        }
        for _ in 0..7 {
            h.extend(int(1));
        }
        for t in texts {
            h.extend(int(t.len() as i32));
            h.extend_from_slice(t);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::write::*;
    use super::*;

    /// The dump's data is read to its end as `pg_restore` reads it: blocks of entries with data,
    /// each once, where the table says, chunks of lengths not negative (an attacker's,
    /// twenty-ninth session: a length of -5 made `pg_restore` read one block forever).
    #[test]
    fn the_data_is_read_as_pg_restore_reads_it() {
        let entry = |id: u32, kind: &str| Entry {
            id,
            kind: kind.into(),
            schema: "public".into(),
            name: "t".into(),
            owner: "app".into(),
            definition: None,
        };
        let block = |kind: u8, id: i32, body: &[&[u8]]| {
            let mut b = vec![kind];
            b.extend(int(id));
            for part in body {
                b.extend_from_slice(part);
            }
            b
        };
        let chunk = |bytes: &[u8]| text(Some(bytes));
        let end = int(0);
        let table = block(1, 5, &[&chunk(b"abc"), &end]);
        let blobs = block(3, 6, &[&int(16404), &chunk(b"xy"), &end, &int(0)]);
        // The table's data where its entry says (after the table of contents), the large
        // objects' found by reading on.
        let dump = |blocks: &[&[u8]], placed: Option<u64>| {
            let mut d = header(14, [b"app", b"15", b"15"]);
            let toc_len = {
                let mut t = int(2);
                t.extend(entry_bytes_with(
                    14,
                    &entry(5, "TABLE DATA"),
                    &Raw {
                        had_data: 1,
                        flag: 2,
                        ..PG_DUMP
                    },
                ));
                t.extend(entry_bytes_with(
                    14,
                    &entry(6, "BLOBS"),
                    &Raw {
                        had_data: 1,
                        flag: 1,
                        ..PG_DUMP
                    },
                ));
                t.len()
            };
            let at = placed.unwrap_or((d.len() + toc_len) as u64);
            d.extend(int(2));
            d.extend(entry_bytes_with(
                14,
                &entry(5, "TABLE DATA"),
                &Raw {
                    had_data: 1,
                    flag: 2,
                    offset: at,
                    ..PG_DUMP
                },
            ));
            d.extend(entry_bytes_with(
                14,
                &entry(6, "BLOBS"),
                &Raw {
                    had_data: 1,
                    flag: 1,
                    ..PG_DUMP
                },
            ));
            for b in blocks {
                d.extend_from_slice(b);
            }
            d
        };
        let read = |d: Vec<u8>, bounded: Option<(u32, u64)>| -> Result<(), ReadError> {
            let mut r = &d[..];
            let mut toc = Toc::read(&mut r, MAX_TOC)?;
            while toc.next_entry()?.is_some() {}
            toc.read_data(bounded).map(|_| ())
        };
        assert_eq!(read(dump(&[&table, &blobs], None), None), Ok(()));
        assert_eq!(read(dump(&[&table, &blobs], None), Some((5, 3))), Ok(()));
        // The bounded entry's bytes are what it reads.
        let kept = {
            let d = dump(&[&table, &blobs], None);
            let mut r = &d[..];
            let mut toc = Toc::read(&mut r, MAX_TOC).unwrap();
            while toc.next_entry().unwrap().is_some() {}
            toc.read_data(Some((5, 3))).unwrap()
        };
        assert_eq!(kept.len(), 3);
        let mut cut = table.clone();
        cut.truncate(cut.len() - 6);
        for (d, bounded, why) in [
            (
                dump(&[&block(1, 5, &[&int(-5)]), &blobs], None),
                None,
                "has a chunk of length -5",
            ),
            (
                dump(&[&table, &blobs, &block(1, 7, &[&end])], None),
                None,
                "block of id 7, which is no entry's with data",
            ),
            (
                dump(&[&table, &blobs, &blobs], None),
                None,
                "has two blocks of id 6",
            ),
            (dump(&[&table], None), None, "has no block for entry 6"),
            (
                dump(&[&blobs, &table], None),
                None,
                "block of id 5 elsewhere than its entry says",
            ),
            (
                dump(&[&table, &blobs], Some(9)),
                None,
                "elsewhere than its entry says",
            ),
            (
                dump(&[&table, &block(2, 6, &[&end])], None),
                None,
                "has a block of type 2",
            ),
            (
                dump(&[&table, &blobs], None),
                Some((5, 2)),
                "has 3 bytes of data for entry 5, where regobox reads at most 2",
            ),
            (dump(&[&cut], None), None, "ends inside a chunk"),
            (
                dump(&[&table, &block(3, 6, &[&int(-1)])], None),
                None,
                "large object of oid -1",
            ),
        ] {
            let got = read(d, bounded);
            assert!(
                matches!(&got, Err(ReadError::Data(w)) if w.contains(why)),
                "{why}: {got:?}"
            );
        }
    }

    /// The table of contents is read as `pg_restore` reads it (`ReadToc`): each format's fields,
    /// the texts regobox reads kept whole (a line break and all), and what `pg_restore` would
    /// read otherwise than regobox (an integer beyond a C `int`, a text holding a NUL) refused.
    #[test]
    fn entries_are_read_as_pg_restore_reads_them() {
        let e = Entry {
            id: 219,
            kind: "FUNCTION".into(),
            schema: "public".into(),
            name: "f(integer, text)\nx".into(),
            owner: "app".into(),
            definition: None,
        };
        let schema = Entry {
            id: 6,
            kind: "SCHEMA".into(),
            schema: "-".into(),
            name: "s 3".into(),
            owner: "app".into(),
            definition: Some("CREATE SCHEMA \"s 3\";\n".into()),
        };
        for minor in [10, 11, 14, 15, 16] {
            let debian = b"15.18".as_slice();
            let mut d = header(minor, [b"app", debian, debian]);
            d.extend(int(2));
            d.extend(entry_bytes(minor, &e));
            d.extend(entry_bytes(minor, &schema));
            d.extend_from_slice(b"data");
            let mut r = &d[..];
            let mut toc = Toc::read(&mut r, MAX_TOC).unwrap();
            assert_eq!(toc.next_entry(), Ok(Some(e.clone())), "1.{minor}");
            assert_eq!(toc.next_entry(), Ok(Some(schema.clone())), "1.{minor}");
            assert_eq!(toc.next_entry(), Ok(None));
            assert_eq!(r, b"data", "read no further than the table");
        }
        let read = |bytes: Vec<u8>| -> Result<Vec<Entry>, ReadError> {
            let debian = b"15.18".as_slice();
            let mut d = header(14, [b"app", debian, debian]);
            d.extend(bytes);
            let mut r = &d[..];
            let mut toc = Toc::read(&mut r, MAX_TOC)?;
            let mut all = Vec::new();
            while let Some(e) = toc.next_entry()? {
                all.push(e);
            }
            Ok(all)
        };
        let one = |e: &Entry| {
            let mut b = int(1);
            b.extend(entry_bytes(14, e));
            b
        };
        assert_eq!(read(one(&e)), Ok(vec![e.clone()]));
        let with = |f: &dyn Fn(&mut Entry)| {
            let mut x = e.clone();
            f(&mut x);
            one(&x)
        };
        let mut too_large = int(1);
        too_large.extend_from_slice(&[0, 0, 0, 0, 0x80]);
        let mut sign = int(1);
        sign.extend_from_slice(&[2, 1, 0, 0, 0]);
        let nul_name = with(&|x| x.name = "t\0x".into());
        let not_utf8 = {
            let mut b = one(&e);
            let at = b.windows(3).position(|w| w == b"f(i").unwrap();
            b[at] = 0xff;
            b
        };
        let long_name = with(&|x| x.name = "a".repeat(MAX_TOC_TEXT + 1));
        let no_oids = {
            let mut b = one(&e);
            let at = b.windows(5).position(|w| w == b"false").unwrap();
            b.splice(at - 5..at + 5, int(-1));
            b
        };
        let flag = {
            let mut b = one(&e);
            let at = b.len() - 9;
            b[at] = 4;
            b
        };
        let no_kind = {
            let mut b = one(&e);
            let kind = text(Some(b"FUNCTION"));
            let at = b.windows(kind.len()).position(|w| w == kind).unwrap();
            b.splice(at..at + kind.len(), int(-1));
            b
        };
        let mut short = one(&e);
        short.truncate(short.len() - 3);
        for (bytes, why) in [
            (too_large, "integer too large (id)"),
            (sign, "integer of sign 2 (id)"),
            (with(&|x| x.id = 0), "entry of id 0"),
            (nul_name, "name holding a NUL (entry 1)"),
            (not_utf8, "name that is not UTF-8 (entry 1)"),
            (long_name, "has a name of 65537 bytes (entry 1)"),
            (no_oids, "without its WITH OIDS (entry 1)"),
            (
                flag,
                "data offset flag 4 for an entry of data flag 0 (entry 1)",
            ),
            (no_kind, "without its kind (entry 1)"),
            (short, "ends before its data offset (entry 1)"),
            (int(MAX_ENTRIES + 1), "says it holds 1000001 entries"),
            (int(-1), "says it holds -1 entries"),
            (int(2), "ends before its id (entry 1)"),
        ] {
            let got = read(bytes);
            assert!(
                matches!(&got, Err(ReadError::Unreadable(w)) if w.contains(why)),
                "{why}: {got:?}"
            );
        }
        // What `pg_restore` reads otherwise than pg_dump writes it (an attacker's, twenty-ninth
        // session: a dependency of -1 made its parallel load write outside an array, as root;
        // a data flag of -1 ran a definition twice; an access method of its own failed the
        // load after the stop).
        let raw = |r: Raw<'_>| {
            let mut b = int(1);
            b.extend(entry_bytes_with(14, &e, &r));
            b
        };
        let dependency = |d: &[u8]| {
            raw(Raw {
                dependencies: &[d],
                ..PG_DUMP
            })
        };
        for (bytes, why) in [
            (dependency(b"-1"), "dependency \"-1\" (not an id)"),
            (dependency(b"abc"), "dependency \"abc\" (not an id)"),
            (dependency(b""), "(not an id)"),
            (dependency(b"0"), "(not an id)"),
            (dependency(b"2147483648"), "(not an id)"),
            (dependency(b"99999999999"), "dependency of 11 bytes"),
            (
                raw(Raw {
                    had_data: -1,
                    ..PG_DUMP
                }),
                "data flag -1",
            ),
            (
                raw(Raw {
                    had_data: 1,
                    ..PG_DUMP
                }),
                "data offset flag 3 for an entry of data flag 1",
            ),
            (
                raw(Raw { flag: 2, ..PG_DUMP }),
                "data offset flag 2 for an entry of data flag 0",
            ),
            (
                raw(Raw {
                    tablespace: Some(b"fast"),
                    ..PG_DUMP
                }),
                "in a tablespace of its own",
            ),
            (
                raw(Raw {
                    access_method: Some(b"he\x1bap"),
                    ..PG_DUMP
                }),
                "access method he\\u{1b}ap (regobox restores heap tables)",
            ),
            // An attacker's (thirty-third session): set as `""`, which fails the load.
            (
                raw(Raw {
                    access_method: Some(b""),
                    ..PG_DUMP
                }),
                "an empty access method",
            ),
        ] {
            let got = read(bytes);
            assert!(
                matches!(&got, Err(ReadError::Unreadable(w)) if w.contains(why)),
                "{why}: {got:?}"
            );
        }
        for r in [
            Raw {
                had_data: 1,
                flag: 1,
                ..PG_DUMP
            },
            Raw {
                had_data: 1,
                flag: 2,
                dependencies: &[],
                access_method: None,
                tablespace: None,
                offset: 0,
            },
        ] {
            assert_eq!(read(raw(r)), Ok(vec![e.clone()]));
        }
        // A dependency beyond the table's highest id is refused once the table is read.
        let beyond = Raw {
            dependencies: &[b"220"],
            ..PG_DUMP
        };
        let mut d = header(14, [b"app", b"15", b"15"]);
        d.extend(raw(beyond));
        let mut r = &d[..];
        let mut toc = Toc::read(&mut r, MAX_TOC).unwrap();
        assert!(toc.next_entry().unwrap().is_some());
        assert_eq!(
            toc.dependencies_within().unwrap_err().to_string(),
            "its table of contents has a dependency on id 220, beyond its highest entry's (219)"
        );
        // A text of length -2 (pg_dump writes -1 for none).
        let mut b = int(1);
        b.extend(int(5));
        b.extend(int(0));
        b.extend(int(-2));
        assert!(read(b).is_err_and(|e| e.to_string().contains("text of length -2")));
    }

    /// A second attacker's (twenty-eighth session): a version holding a line break put a line
    /// of its own into `pg_restore --list` (an entry the check read) and into the SQL the load
    /// ran. The header is read by regobox: its texts are refused if not plain.
    #[test]
    fn a_dumps_header_is_read_and_its_texts_are_plain() {
        let debian = b"15.18 (Debian 15.18-0+deb12u1)".as_slice();
        for minor in [10, 14, 15, 16] {
            let mut h = header(minor, [b"app", debian, debian]);
            h.extend_from_slice(b"the table of contents follows");
            let mut r = &h[..];
            let header_len = (h.len() - b"the table of contents follows".len()) as u64;
            assert_eq!(
                read_header(&mut r),
                Ok(Format { minor, header_len }),
                "1.{minor}"
            );
            assert_eq!(r, b"the table of contents follows");
        }
        for (h, why) in [
            (
                header(14, [b"app", b"15.18\n11; 0 0 SCHEMA - x app", debian]),
                "server's version holding a control character",
            ),
            (
                header(14, [b"app", debian, b"15.18\n; CREATE TABLE t();"]),
                "pg_dump's version holding a control character",
            ),
            (
                header(14, [b"a\rpp", debian, debian]),
                "database's name holding a control character",
            ),
            (header(14, [b"app\0", debian, debian]), "holding a NUL"),
            (header(14, [b"\xff", debian, debian]), "not UTF-8"),
            (header(14, [&[b'a'; 1025], debian, debian]), "of 1025 bytes"),
            (header(17, [b"app", debian, debian]), "version 1.17.0"),
            (header(9, [b"app", debian, debian]), "version 1.9.0"),
            (b"PGDMP".to_vec(), "ends before its version"),
            (b"-- SQL\n".to_vec(), "not a custom-format dump"),
        ] {
            let got = read_header(&mut &h[..]);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {got:?}"
            );
        }
        let mut tar = header(14, [b"app", debian, debian]);
        tar[10] = 3;
        assert!(read_header(&mut &tar[..]).is_err_and(|e| e.contains("says format 3")));
        // Compressed data: not regobox's dump (its dumps are written with `--compress=0`).
        // (1.14: a level after the format's byte, a sign byte then 4; 1.15: an algorithm's byte.)
        for (minor, at, level) in [(14, 12, 9), (15, 11, 1)] {
            let mut h = header(minor, [b"app", debian, debian]);
            h[at] = level;
            assert!(
                read_header(&mut &h[..])
                    .is_err_and(|e| e.contains(&format!("compressed ({level})"))),
                "1.{minor}"
            );
        }
        // Integers of another size than pg_dump's 4 bytes: `pg_restore` would read them into 4.
        for (at, size, why) in [(8, 8, "integers of 8 bytes"), (9, 4, "offsets of 4")] {
            let mut h = header(14, [b"app", debian, debian]);
            h[at] = size;
            assert!(
                read_header(&mut &h[..]).is_err_and(|e| e.contains(why)),
                "{why}"
            );
        }
    }
}
