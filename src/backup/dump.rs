//! What a restore loads from a dump, judged entry by entry on its table of contents.
//!
//! A dump is untrusted input: `pg_restore` runs what it holds with the rights of the role it
//! connects as. A restore therefore connects as the application role (never the superuser), and
//! before it loads anything reads the dump's table of contents (`pg_restore --list`) into
//! [`Entry`]s and decides, for each, one of four things:
//!
//! - loaded by the application role: the kinds of object an owner of the database can create
//!   ([`LOADED`]), owned in the dump by the archive's application role;
//! - made by regobox from what their definitions say, none of whose SQL runs: the dump's schemas
//!   ([`schemas_made`]: their names, made first, owned by the application role);
//! - regobox's own: the configured extensions (regobox creates them first, as the superuser) and
//!   the `regobox` schema (its bookkeeping, rebuilt by regobox from its own definition);
//!   another extension is created by the application role (the server allows trusted ones only);
//! - refused, each named: every other kind (procedural languages, event triggers, foreign data
//!   wrappers, ...) and objects owned by another role (made with rights the application role
//!   does not have).
//!
//! The server is the second wall: whatever the list lets through runs without the superuser's
//! rights (a function calling `COPY ... TO PROGRAM` fails when a materialized view refreshes).

/// The kinds of entry the application role loads (as `pg_restore --list` names them).
pub const LOADED: &[&str] = &[
    "ACL",
    "AGGREGATE",
    "BLOB",
    "BLOB DATA",
    "BLOB METADATA",
    "BLOBS",
    "CAST",
    "CHECK CONSTRAINT",
    "COLLATION",
    "COMMENT",
    "CONSTRAINT",
    "CONVERSION",
    "DEFAULT",
    "DEFAULT ACL",
    "DOMAIN",
    "ENCODING",
    "FK CONSTRAINT",
    "FUNCTION",
    "INDEX",
    "INDEX ATTACH",
    "LARGE OBJECT",
    "MATERIALIZED VIEW",
    "MATERIALIZED VIEW DATA",
    "OPERATOR",
    "POLICY",
    "PROCEDURE",
    "PUBLICATION",
    "PUBLICATION TABLE",
    "PUBLICATION TABLES IN SCHEMA",
    "ROW SECURITY",
    "RULE",
    // Made by regobox under the names their definitions give (see [`schemas_made`]).
    "SCHEMA",
    "SEARCHPATH",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "SEQUENCE SET",
    "SHELL TYPE",
    "STATISTICS",
    "STDSTRINGS",
    "TABLE",
    "TABLE ATTACH",
    "TABLE DATA",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TRIGGER",
    "TYPE",
    "VIEW",
];

/// Kinds known only to be refused (named in the refusal; any kind not listed is refused too).
const REFUSED: &[&str] = &[
    "ACCESS METHOD",
    "DATABASE",
    "DATABASE PROPERTIES",
    "EVENT TRIGGER",
    "EXTENSION",
    "FOREIGN DATA WRAPPER",
    "FOREIGN TABLE",
    "OPERATOR CLASS",
    "OPERATOR FAMILY",
    "PROCEDURAL LANGUAGE",
    "SECURITY LABEL",
    "SERVER",
    "SUBSCRIPTION",
    "SUBSCRIPTION TABLE",
    "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE",
    "TRANSFORM",
    "USER MAPPING",
];

/// regobox's own schema in the application database (see `bootstrap::run_init_scripts`).
pub const OWN_SCHEMA: &str = "regobox";

/// Owners that are not a role of the dump's: a schema owned by whoever owns the database.
const DATABASE_OWNER: &str = "pg_database_owner";

/// The longest text a dump's header holds that regobox reads (its database's name, the server's
/// and pg_dump's versions: a few dozen bytes).
const HEADER_TEXT_MAX: i64 = 1024;

/// Read the header of a custom-format dump (what `pg_dump -Fc` writes: `PGDMP`, its format's
/// version, the sizes of its integers and offsets, its compression, when it was made, its
/// database's name and the versions of the server and of pg_dump), as far as those versions,
/// and judge the texts: `pg_restore` prints them as they are, in its `--list` (read by regobox
/// as lines) and in the SQL it runs (a second attacker's, twenty-eighth session: a version
/// holding a line break put a line of its own into both, an entry the check read, a statement
/// the load ran). Each must be at most 1 KiB of UTF-8 without a control character. What is
/// wrong, for a message, otherwise; `r` is read no further than the texts' end.
pub fn read_header(r: &mut impl std::io::Read) -> Result<(), String> {
    let mut h = Header { r, int_size: 0 };
    let mut magic = [0u8; 5];
    for m in &mut magic {
        *m = h.byte("format's name")?;
    }
    if &magic != b"PGDMP" {
        return Err("is not a custom-format dump's (`PGDMP`)".into());
    }
    let version = (h.byte("version")?, h.byte("version")?, h.byte("version")?);
    h.int_size = h.byte("integers' size")?;
    let _offset_size = h.byte("offsets' size")?;
    let format = h.byte("format")?;
    // pg_dump writes 1.10 (PostgreSQL 9.0) to 1.16 (PostgreSQL 17), custom format (1).
    if version.0 != 1 || !(10..=16).contains(&version.1) || format != 1 {
        return Err(format!(
            "says format {} version {}.{}.{}, not the custom format of a dump regobox restores",
            format, version.0, version.1, version.2
        ));
    }
    if !(1..=8).contains(&h.int_size) {
        return Err(format!("says integers of {} bytes", h.int_size));
    }
    if version.1 >= 15 {
        h.byte("compression")?;
    } else {
        h.int("compression")?;
    }
    for _ in 0..7 {
        h.int("date")?;
    }
    for what in ["database's name", "server's version", "pg_dump's version"] {
        let len = h.int(what)?;
        if len < 0 {
            continue;
        }
        if len > HEADER_TEXT_MAX {
            return Err(format!("has a {what} of {len} bytes"));
        }
        let mut text = vec![0u8; len as usize];
        for t in &mut text {
            *t = h.byte(what)?;
        }
        let text =
            String::from_utf8(text).map_err(|_| format!("has a {what} that is not UTF-8"))?;
        if text.chars().any(char::is_control) {
            return Err(format!(
                "has a {what} holding a control character: {}",
                shortened(&format!("{text:?}"))
            ));
        }
    }
    Ok(())
}

/// A dump's header as [`read_header`] reads it.
struct Header<'a, R> {
    r: &'a mut R,
    int_size: u8,
}

impl<R: std::io::Read> Header<'_, R> {
    fn byte(&mut self, what: &str) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("ends before its {what}"))?;
        Ok(b[0])
    }

    /// An integer as pg_dump writes one: a sign byte, then its size's bytes, least first.
    fn int(&mut self, what: &str) -> Result<i64, String> {
        let negative = self.byte(what)? != 0;
        let mut v: u64 = 0;
        for i in 0..self.int_size {
            v |= u64::from(self.byte(what)?) << (8 * u32::from(i));
        }
        let v = i64::try_from(v).map_err(|_| format!("holds an integer too large ({what})"))?;
        Ok(if negative { -v } else { v })
    }
}

/// One line of `pg_restore --list`: `<id>; <catalog oid> <oid> <kind> <schema> <name> <owner>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The line as `pg_restore` printed it (what `--use-list` reads back).
    pub line: String,
    /// The entry's dump id (what `--use-list` selects by: every entry of that id).
    pub id: u32,
    pub kind: String,
    pub schema: String,
    /// The object's name, as printed (`evil()`, `EXTENSION "uuid-ossp"` for a comment).
    pub name: String,
    pub owner: String,
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
}

/// Read one line of a table of contents; `None` for comments and blank lines.
pub fn parse_line(line: &str) -> Result<Option<Entry>, String> {
    let trimmed = line.trim_end_matches(['\r', '\n']);
    if trimmed.trim().is_empty() || trimmed.starts_with(';') {
        return Ok(None);
    }
    let bad = || format!("cannot read the dump's table of contents line {trimmed:?}");
    let (id, rest) = trimmed.split_once("; ").ok_or_else(bad)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let id: u32 = id.parse().map_err(|_| bad())?;
    // Two object ids, then the kind (one or more words).
    let mut rest = rest;
    for _ in 0..2 {
        let (oid, tail) = rest.split_once(' ').ok_or_else(bad)?;
        if !oid.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        rest = tail;
    }
    let kind = LOADED
        .iter()
        .chain(REFUSED)
        .filter(|k| {
            rest.strip_prefix(**k)
                .is_some_and(|tail| tail.starts_with(' '))
        })
        .max_by_key(|k| k.len())
        .map(|k| k.to_string());
    let Some(kind) = kind else {
        // A kind this regobox does not know: refused by name (its first word).
        let word = rest.split(' ').next().unwrap_or_default().to_string();
        return Ok(Some(Entry {
            line: trimmed.into(),
            id,
            kind: word,
            schema: String::new(),
            name: rest.into(),
            owner: String::new(),
        }));
    };
    let tail = &rest[kind.len() + 1..];
    let (schema, tail) = tail.split_once(' ').ok_or_else(bad)?;
    // The owner is the last word (empty for an extension: the line ends with a space).
    let (name, owner) = tail.rsplit_once(' ').ok_or_else(bad)?;
    Ok(Some(Entry {
        line: trimmed.into(),
        id,
        kind,
        schema: schema.into(),
        name: name.into(),
        owner: owner.into(),
    }))
}

/// What to do with a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// The dump's schemas (its `SCHEMA` entries' lines), made by regobox itself under the names
    /// their definitions give ([`schemas_made`]) before anything else loads.
    pub schemas: String,
    /// The `--use-list` of the application role's second `pg_restore`: everything else.
    pub list: String,
    /// Entries left to regobox (configured extensions, its own schema).
    pub own: Vec<Entry>,
    /// Whether the dump holds rows of `regobox.init_scripts`.
    pub init_scripts_rows: bool,
}

/// Who loads, and what regobox creates itself.
pub struct Judge<'a> {
    /// The role that owned the application's objects in the dump (the archive's `user`).
    pub owner: &'a str,
    /// `postgres.extensions`.
    pub extensions: &'a [String],
}

/// The longest line of a table of contents read: an entry's line names an object (at most 63
/// bytes a name, a function's argument types with it: a few KiB at most). A crafted dump's
/// entry of a 700 MiB name, 24 KB compressed, made a restore's check hold 4 GB.
pub const MAX_TOC_LINE: usize = 64 << 10;

/// The most of a table of contents read (a million objects list in about 50 MiB).
pub const MAX_TOC: u64 = 256 << 20;

/// The most schemas a restore makes (a dump of a million, 45 MiB of table of contents, is
/// checked in seconds; each costs the check about 150 bytes while it reads their definitions).
pub const MAX_SCHEMAS: usize = 1_000_000;

/// Refusals named in a refusal's message; the rest are counted.
const NAMED: usize = 20;

/// The longest a named refusal is in a message.
const NAMED_LEN: usize = 300;

/// Why a dump is refused: the entries the application role cannot load, each with why (the
/// first [`NAMED`], then how many more).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refusals {
    pub named: Vec<String>,
    pub more: usize,
}

impl Refusals {
    fn push(&mut self, why: String) {
        if self.named.len() < NAMED {
            self.named.push(shorten(why, NAMED_LEN));
        } else {
            self.more += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}

impl std::fmt::Display for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.named.join("; "))?;
        if self.more > 0 {
            write!(f, "; and {} more", self.more)?;
        }
        Ok(())
    }
}

/// `s` as a message names it (at most a few hundred bytes, see [`Refusals`]).
pub fn shortened(s: &str) -> String {
    shorten(s.to_string(), NAMED_LEN)
}

/// `s` cut to at most `max` bytes (on a character's boundary), `…` saying so.
fn shorten(mut s: String, max: usize) -> String {
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

/// What refuses a dump on its table of contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TocError {
    /// Entries the application role cannot load.
    #[error("{0}")]
    Refused(Refusals),
    /// A table of contents regobox does not read (bounded, UTF-8).
    #[error("its table of contents {0}")]
    Unreadable(String),
}

/// [`judge_reader`] on a table of contents held whole.
#[cfg(test)]
pub fn judge(toc: &str, judge: &Judge<'_>) -> Result<Load, TocError> {
    judge_reader(toc.as_bytes(), judge)
}

/// Decide, entry by entry, what the application role loads (see the module documentation),
/// reading the table of contents as it streams (`pg_restore --list`'s output): a line is read
/// up to [`MAX_TOC_LINE`], the whole up to [`MAX_TOC`], and only what the load needs is kept
/// (the lines it loads, the first refusals), so that no dump makes a reader hold more.
pub fn judge_reader(toc: impl std::io::BufRead, judge: &Judge<'_>) -> Result<Load, TocError> {
    judge_within(toc, judge, MAX_TOC)
}

/// [`judge_reader`] with the whole's bound `max` (a test's smaller one reads less).
fn judge_within(
    mut toc: impl std::io::BufRead,
    judge: &Judge<'_>,
    max: u64,
) -> Result<Load, TocError> {
    use std::io::{BufRead, Read};
    let mut schemas = String::new();
    let mut schema_count = 0usize;
    let mut ids = std::collections::HashSet::new();
    let mut list = String::new();
    let mut own = Vec::new();
    let mut refused = Refusals::default();
    let mut init_scripts_rows = false;
    let mut raw = Vec::new();
    let mut read = 0u64;
    for number in 1.. {
        raw.clear();
        let n = (&mut toc)
            .take(MAX_TOC_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .map_err(|e| TocError::Unreadable(format!("cannot be read: {e}")))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read > max {
            return Err(TocError::Unreadable(format!(
                "is longer than {} MiB",
                max >> 20
            )));
        }
        if raw.len() > MAX_TOC_LINE {
            return Err(TocError::Unreadable(format!(
                "has a line (line {number}) longer than {} KiB, which no object of PostgreSQL's needs (a name is at most 63 bytes)",
                MAX_TOC_LINE >> 10
            )));
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            return Err(TocError::Unreadable(format!(
                "is not UTF-8 (line {number})"
            )));
        };
        let entry = match parse_line(line) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                refused.push(e);
                continue;
            }
        };
        // `--use-list` selects by id: every entry of an id listed is restored, whatever the
        // line says (a second attacker's, twenty-eighth session: a SCHEMA entry sharing a
        // table's id ran its definition in the load, as the application role). pg_dump
        // numbers each entry once.
        if !ids.insert(entry.id) {
            refused.push(format!(
                "{} (its id {} is another entry's too)",
                entry.describe(),
                entry.id
            ));
            continue;
        }
        if is_own_schema(&entry) {
            if entry.kind == "TABLE DATA" && entry.name == "init_scripts" {
                init_scripts_rows = true;
            }
            own.push(entry);
            continue;
        }
        if entry.kind == "EXTENSION" || is_extension_comment(&entry) {
            let name = if entry.kind == "EXTENSION" {
                entry.name.clone()
            } else {
                unquote(entry.name.trim_start_matches("EXTENSION "))
            };
            if judge.extensions.contains(&name) {
                // Each is read on its own by the restore's check and its load (see
                // `extension_schema`): one entry each, as pg_dump writes (an attacker's 40 KB
                // archive of 20 000 kept the check busy for hours, one read of the dump each).
                let twice = entry.kind == "EXTENSION"
                    && own
                        .iter()
                        .any(|e| e.kind == "EXTENSION" && e.name == entry.name);
                if twice {
                    refused.push(format!("{} (twice in the dump)", entry.describe()));
                } else {
                    own.push(entry);
                }
            } else {
                // Made by the application itself (a trusted extension): created again by the
                // application role, which the server refuses for an untrusted one.
                list.push_str(&entry.line);
                list.push('\n');
            }
            continue;
        }
        if !LOADED.contains(&entry.kind.as_str()) {
            refused.push(format!(
                "{} (a kind of object the application role cannot create)",
                entry.describe()
            ));
            continue;
        }
        let owned =
            entry.owner.is_empty() || entry.owner == judge.owner || entry.owner == DATABASE_OWNER;
        if !owned {
            refused.push(format!(
                "{} (owned by {}, not by the application role {})",
                entry.describe(),
                entry.owner,
                judge.owner
            ));
            continue;
        }
        if entry.kind == "SCHEMA" {
            schema_count += 1;
            if schema_count == MAX_SCHEMAS + 1 {
                refused.push(format!(
                    "more than {MAX_SCHEMAS} schemas (what regobox restores at most)"
                ));
            }
            schemas.push_str(&entry.line);
            schemas.push('\n');
            continue;
        }
        list.push_str(&entry.line);
        list.push('\n');
    }
    if refused.is_empty() {
        Ok(Load {
            schemas,
            list,
            own,
            init_scripts_rows,
        })
    } else {
        Err(TocError::Refused(refused))
    }
}

/// regobox's own entries, exactly as regobox makes them (the schema, its table and the
/// table's key, data and grants): anything else, whatever its name looks like, is the
/// application's and is loaded (never dropped).
fn is_own_schema(e: &Entry) -> bool {
    let (schema, name) = (e.schema.as_str(), e.name.as_str());
    match e.kind.as_str() {
        "SCHEMA" => schema == "-" && name == OWN_SCHEMA,
        "TABLE" | "TABLE DATA" => schema == OWN_SCHEMA && name == "init_scripts",
        "CONSTRAINT" => schema == OWN_SCHEMA && name == "init_scripts init_scripts_pkey",
        "ACL" | "COMMENT" => {
            (schema == "-" && name == format!("SCHEMA {OWN_SCHEMA}"))
                || (schema == OWN_SCHEMA && name == "TABLE init_scripts")
        }
        _ => false,
    }
}

fn is_extension_comment(e: &Entry) -> bool {
    e.kind == "COMMENT" && e.name.starts_with("EXTENSION ")
}

/// `"uuid-ossp"` → `uuid-ossp`.
fn unquote(s: &str) -> String {
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => s.to_string(),
    }
}

/// The schema a configured extension is created in, as the SQL of its entry
/// (`pg_restore --file=- --schema-only`'s output) gives it: the line `CREATE EXTENSION IF NOT
/// EXISTS <name> WITH SCHEMA <schema>;` as `pg_dump` writes it, `<schema>` a plain lower-case
/// identifier or one in double quotes, and a schema the restored database has: `public` or one
/// of the dump's that regobox makes (`made`, see [`schemas_made`]), never PostgreSQL's own
/// (`pg_*`, `information_schema`) or regobox's. What is wrong, for a message, otherwise. The
/// one reading of a restore's check and of its load: what one takes, the other does.
pub fn extension_schema(sql: &[u8], made: &[String]) -> Result<String, String> {
    let sql = std::str::from_utf8(sql).map_err(|_| "is not UTF-8".to_string())?;
    let encoding = sql
        .lines()
        .find_map(client_encoding)
        .unwrap_or("UTF8")
        .to_string();
    // The statement, its schema's name to the end of its quotes (a line break may be inside).
    let written = sql
        .match_indices("CREATE EXTENSION IF NOT EXISTS ")
        .filter(|(at, _)| *at == 0 || sql.as_bytes()[at - 1] == b'\n')
        .find_map(|(at, prefix)| {
            let line_end = sql[at..].find('\n').map_or(sql.len(), |n| at + n);
            let (_, after) = sql[at + prefix.len()..line_end].split_once(" WITH SCHEMA ")?;
            let start = line_end - after.len();
            let len = written_name_len(&sql[start..])?;
            let rest = &sql[start + len..];
            (rest == ";" || rest.starts_with(";\n")).then(|| &sql[start..start + len])
        })
        .ok_or("is not `CREATE EXTENSION IF NOT EXISTS <name> WITH SCHEMA <schema>;`")?;
    let schema = identifier(written).ok_or_else(|| {
        format!(
            "names its schema {} (not an identifier as pg_dump writes one)",
            shortened(written)
        )
    })?;
    name_read_in(&schema, &encoding)?;
    if reserved(&schema) {
        return Err(format!(
            "puts it in {} (PostgreSQL's or regobox's own schema)",
            shortened(&schema)
        ));
    }
    if schema != "public" && !made.contains(&schema) {
        return Err(format!(
            "puts it in schema {}, which the dump does not make",
            shortened(&schema)
        ));
    }
    Ok(schema)
}

/// How long the name `pg_dump` wrote at the start of `s` is, if one is: in double quotes (a
/// quote inside doubled, line breaks and all), or else to the statement's `;` or the line's end.
fn written_name_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.first() == Some(&b'"') {
        let mut i = 1;
        while i < bytes.len() {
            if bytes[i] == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                return Some(i + 1);
            }
            i += 1;
        }
        None
    } else {
        // To the statement's end: what is not plain is judged as a name (and refused) there.
        let n = bytes
            .iter()
            .take_while(|b| !matches!(b, b';' | b'\n'))
            .count();
        (n > 0).then_some(n)
    }
}

/// The encoding `pg_restore`'s header names for the SQL that follows (the dump's), from its line
/// `SET client_encoding = '<name>';`.
fn client_encoding(line: &str) -> Option<&str> {
    line.strip_prefix("SET client_encoding = '")?
        .strip_suffix("';")
}

/// Whether regobox reads `name`, from SQL in `encoding`, as PostgreSQL does: a dump's SQL is in
/// its own encoding, which regobox reads as UTF-8 in a UTF8 dump (and a SQL_ASCII one, whose
/// bytes the restored UTF8 database takes as they are), and in any other only in ASCII, which
/// every encoding PostgreSQL serves writes alike (an attacker's, twenty-eighth session: a
/// LATIN1 dump's schema `Ã©`, its bytes read as UTF-8, was made as `é`, and its table's
/// statement, converted from LATIN1, found no schema after the stop).
fn name_read_in(name: &str, encoding: &str) -> Result<(), String> {
    if name.is_ascii() || matches!(encoding, "UTF8" | "SQL_ASCII") {
        return Ok(());
    }
    Err(format!(
        "name {} in a dump encoded in {}: regobox reads names beyond ASCII in UTF8 dumps only",
        shortened(name),
        shortened(encoding)
    ))
}

/// The settings `pg_restore` writes at the start of the SQL it prints or runs for a dump
/// (`_doSetFixedOutputState`, PostgreSQL 12 to 18), each once, `row_security` last.
const HEADER_SETTINGS: &[&str] = &[
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
    "client_encoding",
    "standard_conforming_strings",
    "check_function_bodies",
    "xmloption",
    "client_min_messages",
    // Where the dump's strings are not standard-conforming.
    "escape_string_warning",
    "row_security",
];

/// The `search_path` line pg_dump writes as the dump's `SEARCHPATH` entry, which `pg_restore`
/// runs at the start of every connection whatever its list selects.
const SEARCH_PATH_LINE: &str = "SELECT pg_catalog.set_config('search_path', '', false);";

/// Which of `pg_restore`'s header settings `line` is, if it is one: `SET <name> = <value>;`, a
/// plain value, or pg_dump's `search_path` line.
fn header_setting(line: &str) -> Option<&'static str> {
    if line == SEARCH_PATH_LINE {
        return Some("search_path");
    }
    let (name, value) = line
        .strip_prefix("SET ")?
        .strip_suffix(';')?
        .split_once(" = ")?;
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'\''));
    HEADER_SETTINGS
        .iter()
        .find(|s| **s == name)
        .copied()
        .filter(|_| plain)
}

/// Judge the SQL `pg_restore --file=- --schema-only` prints for a dump's list (`sql`, read as it
/// streams, each line's first bytes kept): its header holds `pg_restore`'s settings alone, each
/// once, and pg_dump's `search_path` line, which comes from the dump's `SEARCHPATH` entry, is
/// the line pg_dump writes or none; nothing after the header says one of them again. That
/// entry is in no list (`pg_restore --list` does not print it), and `pg_restore` runs its SQL
/// at the start of every connection, the load's included (a third attacker's, twenty-eighth
/// session: a `SEARCHPATH` entry's `CREATE TABLE` ran four times in the load, as the
/// application role, never judged). Whether the header ended (the SQL may end before it, where
/// `pg_restore` failed); what is wrong, for a message, otherwise.
pub fn judge_sql_header(mut sql: impl std::io::BufRead) -> Result<bool, String> {
    use std::collections::HashSet;
    const KEPT: usize = 512;
    let mut seen: HashSet<&'static str> = HashSet::new();
    let mut in_header = true;
    let mut line = Vec::new();
    loop {
        // One line, its first KEPT bytes kept.
        line.clear();
        let mut ended = false;
        let mut any = false;
        while !ended {
            let buf = sql.fill_buf().map_err(|e| format!("cannot be read: {e}"))?;
            if buf.is_empty() {
                break;
            }
            any = true;
            let (take, found) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = KEPT.saturating_sub(line.len()).min(take);
            line.extend_from_slice(&buf[..room]);
            sql.consume(take);
            ended = found;
        }
        if !any {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let setting = header_setting(text);
        if !in_header {
            if setting.is_some() {
                return Err(format!(
                    "says `{}` again after its header (a dump's SEARCHPATH entry of more than pg_dump's line)",
                    shortened(text)
                ));
            }
            continue;
        }
        if text.is_empty() || text.starts_with("--") || text.starts_with("\\restrict ") {
            continue;
        }
        match setting {
            Some(name) if seen.insert(name) => in_header = name != "row_security",
            Some(_) => {
                return Err(format!(
                    "says `{}` twice in its header (a dump's SEARCHPATH entry of more than pg_dump's line)",
                    shortened(text)
                ));
            }
            None => {
                return Err(format!(
                    "has `{}` in its header, where pg_restore writes its settings and pg_dump's search_path line alone (a dump's SEARCHPATH entry of more than that line)",
                    shortened(text)
                ));
            }
        }
    }
    Ok(!in_header)
}

/// The longest name PostgreSQL holds, in bytes (`NAMEDATALEN` - 1).
const MAX_NAME: usize = 63;

/// A schema of PostgreSQL's own (`pg_*`, `information_schema`) or regobox's.
fn reserved(schema: &str) -> bool {
    schema.starts_with("pg_") || schema == "information_schema" || schema == OWN_SCHEMA
}

/// The schemas the dump's `SCHEMA` entries (`listed`: their lines) make, as their SQL gives them
/// (`pg_restore --file=- --schema-only` of those entries, read as it streams, within the table
/// of contents' bounds): regobox makes them itself under these names, and none of that SQL runs.
/// A schema is a line `CREATE SCHEMA <name>;` as `pg_dump` writes it (`<name>` as
/// [`extension_schema`] reads one), naming one of the entries (as `pg_restore --list` prints a
/// name: a line break read as a space), once; an entry without one is `public` (`pg_dump`
/// writes a comment there: `initdb` made it), and `public` is not made again. Never
/// PostgreSQL's own schemas or regobox's. Every other line is left unread (it never runs).
/// Checked by a restore before anything changes, so that a dump whose schemas could not be
/// made is refused before a service stops (an attacker's, twenty-seventh session: two entries
/// of one name, a `pg_` name, failed the load after the stop).
pub fn schemas_made(mut sql: impl std::io::BufRead, listed: &str) -> Result<Vec<String>, String> {
    use std::collections::{HashMap, HashSet};
    use std::io::{BufRead, Read};
    // How many entries list each name (two schemas may be listed alike: `a b` and `a\nb`).
    let mut names: HashMap<String, usize> = HashMap::new();
    for line in listed.lines() {
        if let Ok(Some(e)) = parse_line(line) {
            *names.entry(e.name).or_default() += 1;
        }
    }
    let mut made: HashSet<String> = HashSet::new();
    let mut encoding: Option<String> = None;
    // Whether an entry's SQL has begun (past `pg_restore`'s header).
    let mut statements = false;
    let mut raw = Vec::new();
    let mut read = 0u64;
    loop {
        raw.clear();
        let n = (&mut sql)
            .take(MAX_TOC_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read > MAX_TOC || raw.len() > MAX_TOC_LINE {
            return Err(format!(
                "are longer than a table of contents is read ({} MiB, a line {} KiB)",
                MAX_TOC >> 20,
                MAX_TOC_LINE >> 10
            ));
        }
        let Some(rest) = raw.strip_prefix(b"CREATE SCHEMA ") else {
            // The header's, before any entry's SQL.
            if encoding.is_none() && !statements {
                let line = String::from_utf8_lossy(&raw);
                encoding = client_encoding(line.trim_end_matches(['\r', '\n'])).map(String::from);
            }
            continue;
        };
        statements = true;
        // A name in quotes may hold line breaks: the statement goes on to its closing quote.
        let mut statement = rest.to_vec();
        let quotes = |b: &[u8]| b.iter().filter(|b| **b == b'"').count();
        let mut open = statement.first() == Some(&b'"') && quotes(&statement) % 2 == 1;
        while open {
            let before = statement.len();
            let n = (&mut sql)
                .take(MAX_TOC_LINE as u64 + 1)
                .read_until(b'\n', &mut statement)
                .map_err(|e| format!("cannot be read: {e}"))?;
            open ^= quotes(&statement[before..]) % 2 == 1;
            read += n as u64;
            if n == 0 || read > MAX_TOC || statement.len() > MAX_TOC_LINE {
                return Err(format!(
                    "hold a `CREATE SCHEMA` whose name does not end within {} KiB",
                    MAX_TOC_LINE >> 10
                ));
            }
        }
        let statement = std::str::from_utf8(&statement).map_err(|_| "are not UTF-8".to_string())?;
        let statement = statement.trim_end_matches(['\r', '\n']);
        let name = statement
            .strip_suffix(';')
            .and_then(identifier)
            .ok_or_else(|| {
                format!(
                    "hold `CREATE SCHEMA {}`, not `CREATE SCHEMA <name>;` as pg_dump writes it",
                    shortened(statement)
                )
            })?;
        if reserved(&name) {
            return Err(format!(
                "make {} (PostgreSQL's or regobox's own schema)",
                shortened(&name)
            ));
        }
        // What PostgreSQL would not keep as it is (it cuts a name at 63 bytes: two names
        // alike up to there are one) or cannot take (a NUL): no dump of it holds one.
        if name.len() > MAX_NAME || name.contains('\0') {
            return Err(format!(
                "make schema {}, a name PostgreSQL does not hold (more than {MAX_NAME} bytes, or a NUL)",
                shortened(&name)
            ));
        }
        name_read_in(&name, encoding.as_deref().unwrap_or("UTF8"))
            .map_err(|why| format!("make a schema whose {why}"))?;
        let as_listed = name.replace(['\n', '\r'], " ");
        match names.get_mut(as_listed.as_str()) {
            Some(left) if *left > 0 => *left -= 1,
            Some(_) => {
                return Err(format!(
                    "make more schemas listed as {} than the dump's table of contents names",
                    shortened(&as_listed)
                ));
            }
            None => {
                return Err(format!(
                    "make schema {}, which no entry of the dump's table of contents names",
                    shortened(&name)
                ));
            }
        }
        if made.contains(&name) {
            return Err(format!("make schema {} twice", shortened(&name)));
        }
        made.insert(name);
    }
    // Each entry has made its schema (`public` is there already).
    if let Some((name, _)) = names
        .iter()
        .find(|(name, left)| *name != "public" && **left > 0)
    {
        return Err(format!(
            "make nothing for SCHEMA {} (no `CREATE SCHEMA <name>;`)",
            shortened(name)
        ));
    }
    made.remove("public");
    let mut made: Vec<String> = made.into_iter().collect();
    made.sort_unstable();
    Ok(made)
}

/// An identifier as `pg_dump` writes one (`fmtId`): a plain lower-case one as it is, any other
/// in double quotes, a quote inside doubled.
fn identifier(s: &str) -> Option<String> {
    if let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        let mut name = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '"' && chars.next() != Some('"') {
                return None;
            }
            name.push(c);
        }
        (!name.is_empty()).then_some(name)
    } else {
        plain(s).then(|| s.to_string())
    }
}

/// A plain lower-case identifier: what `pg_dump` writes without quotes.
fn plain(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'$'))
}

/// The rows of a `COPY ... FROM stdin;` block in PostgreSQL's text format: fields split on
/// tabs, `\N` for NULL, backslash escapes decoded.
pub fn copy_rows(text: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !inside {
            inside = line.starts_with("COPY ") && line.ends_with("FROM stdin;");
            continue;
        }
        if line == "\\." {
            inside = false;
            continue;
        }
        rows.push(
            line.split('\t')
                .map(unescape_field)
                .collect::<Result<_, _>>()?,
        );
    }
    Ok(rows)
}

fn unescape_field(field: &str) -> Result<Option<String>, String> {
    if field == "\\N" {
        return Ok(None);
    }
    let mut out = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            other => {
                return Err(format!(
                    "an escape {other:?} regobox does not read in {field:?}"
                ));
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOC: &str = "\
;
; Archive created at 2026-12-02 06:24:37 UTC
;     dbname: app
;
2; 3079 16403 EXTENSION - uuid-ossp 
3368; 0 0 COMMENT - EXTENSION \"uuid-ossp\" 
6; 2615 16385 SCHEMA - regobox postgres
3367; 0 0 ACL - SCHEMA regobox postgres
214; 1259 16386 TABLE regobox init_scripts postgres
3358; 0 16386 TABLE DATA regobox init_scripts postgres
3208; 2606 16392 CONSTRAINT regobox init_scripts init_scripts_pkey postgres
215; 1259 16391 TABLE public t app
3369; 0 0 ACL public TABLE t app
216; 1259 16394 VIEW public v app
3360; 0 16391 TABLE DATA public t app
219; 1255 16400 FUNCTION public f(integer, text) app
";

    fn judge_with(toc: &str, extensions: &[&str]) -> Result<Load, TocError> {
        let extensions: Vec<String> = extensions.iter().map(|s| s.to_string()).collect();
        judge(
            toc,
            &Judge {
                owner: "app",
                extensions: &extensions,
            },
        )
    }

    #[test]
    fn lines_are_read_with_their_kind_schema_name_and_owner() {
        let e = parse_line("3361; 0 16399 MATERIALIZED VIEW DATA public mv postgres")
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                e.kind.as_str(),
                e.schema.as_str(),
                e.name.as_str(),
                e.owner.as_str()
            ),
            ("MATERIALIZED VIEW DATA", "public", "mv", "postgres")
        );
        let e = parse_line("219; 1255 16400 FUNCTION public f(integer, text) app")
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.name.as_str(), e.owner.as_str()),
            ("f(integer, text)", "app")
        );
        let e = parse_line("2; 3079 16403 EXTENSION - uuid-ossp ")
            .unwrap()
            .unwrap();
        assert_eq!((e.name.as_str(), e.owner.as_str()), ("uuid-ossp", ""));
        assert_eq!(parse_line("; comment").unwrap(), None);
        assert!(parse_line("x; 1 2 TABLE public t app").is_err());
    }

    #[test]
    fn the_application_role_loads_its_own_objects_and_regobox_keeps_its_own() {
        let load = judge_with(TOC, &["uuid-ossp"]).unwrap();
        let loaded: Vec<&str> = load.list.lines().collect();
        assert_eq!(loaded.len(), 5, "{loaded:?}");
        assert_eq!(
            extension_schema(
                b"SET x;\nCREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA s3;\n",
                &["s3".to_string()]
            ),
            Ok("s3".into())
        );
        assert!(loaded.iter().all(|l| l.ends_with(" app")), "{loaded:?}");
        assert_eq!(load.own.len(), 7);
        assert!(load.init_scripts_rows);
    }

    /// A second attacker's finding: 20 000 entries of a configured extension (a 40 KB archive)
    /// kept a restore's check busy for hours, each read on its own. pg_dump writes one.
    #[test]
    fn a_configured_extension_twice_is_refused() {
        let toc = format!("{TOC}7; 3079 16404 EXTENSION - uuid-ossp \n");
        let refused = judge_with(&toc, &["uuid-ossp"]).map(|_| ()).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("uuid-ossp (twice in the dump)"),
            "{refused}"
        );
        // Not configured: the application role's to create (the server refuses the second).
        assert!(judge_with(&toc, &[]).is_ok());
    }

    /// An attacker's findings: a configured extension's definition that the restore's check
    /// took and its load did not (not UTF-8), or that failed after the services stopped (a
    /// schema the restored database does not have, `Public` unquoted, which SQL folds), or that
    /// put the extension in PostgreSQL's own schema.
    #[test]
    fn an_extensions_schema_is_one_the_restored_database_has() {
        let made = ["s3".to_string(), "My \"S\"".to_string(), "s 3".to_string()];
        let sql = |schema: &str| {
            format!("SET x;\nCREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA {schema};\n")
        };
        let read = |schema: &str| extension_schema(sql(schema).as_bytes(), &made);
        assert_eq!(read("public"), Ok("public".into()));
        assert_eq!(read("s3"), Ok("s3".into()));
        assert_eq!(read("\"s3\""), Ok("s3".into()));
        // Made by regobox under the names the schemas' definitions give (not as `pg_restore
        // --list` prints them, which reads a line break as a space).
        assert_eq!(read("\"My \"\"S\"\"\""), Ok("My \"S\"".into()));
        assert_eq!(read("\"s 3\""), Ok("s 3".into()));
        for bad in [
            "\"s3 \"",
            "nowhere",
            "Public",
            "\"Public\"",
            "public ",
            "pg_catalog",
            "pg_temp",
            "information_schema",
            "regobox",
            "\"pg_catalog\"",
            "\"a\"b\"",
            "\"\"",
            "s3; DROP TABLE t; --",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let mut not_text = sql("public").into_bytes();
        not_text.extend_from_slice(b"-- \xff\n");
        assert_eq!(
            extension_schema(&not_text, &made),
            Err("is not UTF-8".to_string())
        );
        assert!(extension_schema(b"CREATE EXTENSION \"uuid-ossp\";\n", &made).is_err());
        // A schema's name over two lines (an attacker's: refused, as its line was read alone).
        let made = ["e\nx".to_string(), "é".to_string()];
        assert_eq!(
            extension_schema(
                b"CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA \"e\nx\";\n",
                &made
            ),
            Ok("e\nx".into())
        );
        assert!(
            extension_schema(
                b"CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA \"e\nx\"; SELECT 1;\n",
                &made
            )
            .is_err()
        );
        let in_latin1 = "SET client_encoding = 'LATIN1';\nCREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA \"é\";\n";
        assert!(
            extension_schema(in_latin1.as_bytes(), &made)
                .is_err_and(|e| e.contains("encoded in LATIN1"))
        );
        let in_utf8 = in_latin1.replace("LATIN1", "UTF8");
        assert_eq!(extension_schema(in_utf8.as_bytes(), &made), Ok("é".into()));
    }

    /// A dump's header as pg_dump writes it (format 1.`minor`, 4-byte integers), its database's
    /// name and versions `texts`.
    fn header(minor: u8, texts: [&[u8]; 3]) -> Vec<u8> {
        let int = |v: i32| {
            let mut b = vec![u8::from(v < 0)];
            b.extend_from_slice(&v.unsigned_abs().to_le_bytes());
            b
        };
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
        h.extend_from_slice(b"the table of contents follows");
        h
    }

    /// A second attacker's (twenty-eighth session): a version holding a line break put a line
    /// of its own into `pg_restore --list` (an entry the check read) and into the SQL the load
    /// ran. The header is read by regobox: its texts are refused if not plain.
    #[test]
    fn a_dumps_header_is_read_and_its_texts_are_plain() {
        let debian = b"15.18 (Debian 15.18-0+deb12u1)".as_slice();
        for minor in [10, 14, 15, 16] {
            let h = header(minor, [b"app", debian, debian]);
            let mut r = &h[..];
            assert_eq!(read_header(&mut r), Ok(()), "1.{minor}");
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
            (header(14, [b"app\0", debian, debian]), "control character"),
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
    }

    /// A third attacker's (twenty-eighth session): a dump's `SEARCHPATH` entry, which no list
    /// names and `pg_restore` runs at every connection, ran its SQL in the load. The SQL
    /// `pg_restore` prints for the load's list has its header alone there.
    #[test]
    fn the_sql_header_is_pg_restores_alone() {
        let pg15 = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\n-- Dumped from database version 15.18\n\n\
            SET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\n\
            SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\
            SELECT pg_catalog.set_config('search_path', '', false);\n\
            SET check_function_bodies = false;\nSET xmloption = content;\nSET client_min_messages = warning;\n\
            SET row_security = off;\n\nSET default_tablespace = '';\n\n--\n-- Name: t; Type: TABLE\n--\n\n\
            CREATE TABLE public.t (x integer);\n\n\\unrestrict abc\n";
        let judge = |sql: &str| judge_sql_header(sql.as_bytes());
        assert_eq!(judge(pg15), Ok(true));
        let pg17 = pg15.replace(
            "SET idle_in_transaction_session_timeout = 0;\n",
            "SET idle_in_transaction_session_timeout = 0;\nSET transaction_timeout = 0;\n",
        );
        assert_eq!(judge(&pg17), Ok(true));
        // A dump without a SEARCHPATH entry (before pg_dump 11): no line.
        assert_eq!(judge(&pg15.replace(SEARCH_PATH_LINE, "")), Ok(true));
        let long = format!("{pg15}-- {}\n", "x".repeat(1 << 20));
        assert_eq!(judge(&long), Ok(true));
        // A dump whose strings are not standard-conforming (no STDSTRINGS entry).
        let escapes = pg15
            .replace("conforming_strings = on", "conforming_strings = off")
            .replace(
                "SET row_security",
                "SET escape_string_warning = off;\nSET row_security",
            );
        assert_eq!(judge(&escapes), Ok(true));
        // Ended before its header did (pg_restore failed).
        assert_eq!(
            judge(&pg15[..pg15.find("SET xmloption").unwrap()]),
            Ok(false)
        );
        for (sql, why) in [
            (
                pg15.replace(SEARCH_PATH_LINE, &format!("{SEARCH_PATH_LINE}\nCREATE TABLE public.ran();")),
                "has `CREATE TABLE public.ran();` in its header",
            ),
            (
                pg15.replace(
                    SEARCH_PATH_LINE,
                    "SELECT pg_catalog.set_config('search_path', 'public', false);",
                ),
                "in its header",
            ),
            (
                pg15.replace(
                    SEARCH_PATH_LINE,
                    &format!("{SEARCH_PATH_LINE}\nSET check_function_bodies = false;\nSET xmloption = content;\nSET client_min_messages = warning;\nSET row_security = off;\nCREATE TABLE public.ran();"),
                ),
                "again after its header",
            ),
            (
                pg15.replace(SEARCH_PATH_LINE, "SET lock_timeout = 0;"),
                "twice in its header",
            ),
            (
                pg15.replace(SEARCH_PATH_LINE, "SET role = postgres;"),
                "in its header",
            ),
            (
                pg15.replace(SEARCH_PATH_LINE, "SET lock_timeout = 0; DROP TABLE t;"),
                "in its header",
            ),
        ] {
            let got = judge(&sql);
            assert!(got.as_ref().is_err_and(|e| e.contains(why)), "{why}: {got:?}");
        }
    }

    /// `--use-list` selects every entry of an id it lists: two entries of one id are refused.
    #[test]
    fn two_entries_of_one_id_are_refused() {
        let toc = format!("{TOC}215; 2615 16500 SCHEMA - s3 app\n");
        let refused = judge_with(&toc, &[]).map(|_| ()).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "SCHEMA s3 (its id 215 is another entry's too)"
        );
        let toc = format!("{TOC}4294967296; 2615 16500 SCHEMA - s3 app\n");
        assert!(judge_with(&toc, &[]).is_err());
    }

    /// A dump of more schemas than a restore makes is refused with its table of contents.
    #[test]
    fn more_schemas_than_a_restore_makes_are_refused() {
        let toc: String = (0..=MAX_SCHEMAS)
            .map(|i| format!("{}; 2615 1 SCHEMA - s{i} app\n", i + 6))
            .collect();
        let refused = judge_with(&toc, &[]).map(|_| ()).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "more than 1000000 schemas (what regobox restores at most)"
        );
        let toc: String = toc.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            judge_with(&toc, &[]).unwrap().schemas.lines().count(),
            MAX_SCHEMAS
        );
    }

    /// The dump's schemas, made by regobox from their definitions: each `CREATE SCHEMA <name>;`
    /// as pg_dump writes it, of an entry's name, once; `public` is there already; nothing else
    /// of the definitions is read (none of it runs).
    #[test]
    fn a_dumps_schemas_are_the_names_its_definitions_give() {
        let entries = |names: &[&str]| -> String {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{}; 2615 1638{i} SCHEMA - {n} app\n", i + 6))
                .collect()
        };
        let made = |sql: &str, names: &[&str]| schemas_made(sql.as_bytes(), &entries(names));
        let header = "--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\n";
        let sql = format!(
            "{header}--\n-- Name: s3; Type: SCHEMA; Schema: -; Owner: app\n--\n\nCREATE SCHEMA s3;\n\n\nALTER SCHEMA s3 OWNER TO app;\n\
             CREATE SCHEMA \"My Data\";\nCREATE SCHEMA \"a\nb\";\nCREATE SCHEMA \"q\"\"x\";\n\
             -- *not* creating schema, since initdb creates it\nDROP TABLE t; CREATE TABLE u();\n"
        );
        assert_eq!(
            made(&sql, &["s3", "My Data", "a b", "q\"x", "public"]),
            Ok(vec![
                "My Data".to_string(),
                "a\nb".into(),
                "q\"x".into(),
                "s3".into()
            ])
        );
        // `public` made again by its definition: it is there already.
        assert_eq!(
            made(
                "CREATE SCHEMA public;\nCREATE SCHEMA s3;\n",
                &["public", "s3"]
            ),
            Ok(vec!["s3".to_string()])
        );
        for (sql, names, why) in [
            (
                &b"CREATE SCHEMA s3;\nCREATE SCHEMA s3;\n"[..],
                &["s3", "s3"][..],
                "twice",
            ),
            (b"CREATE SCHEMA pg_s;\n", &["pg_s"], "own schema"),
            (b"CREATE SCHEMA regobox;\n", &["s3"], "own schema"),
            (
                b"CREATE SCHEMA information_schema;\n",
                &["information_schema"],
                "own schema",
            ),
            (b"CREATE SCHEMA s4;\n", &["s3"], "no entry"),
            (b"SELECT 1;\n", &["s3"], "make nothing for SCHEMA s3"),
            (b"CREATE SCHEMA S3;\n", &["S3"], "as pg_dump writes it"),
            (
                b"CREATE SCHEMA s3 AUTHORIZATION postgres;\n",
                &["s3"],
                "as pg_dump writes it",
            ),
            (
                b"CREATE SCHEMA \"s3\"x\"\";\n",
                &["s3\"x\""],
                "as pg_dump writes it",
            ),
            (b"CREATE SCHEMA \xff;\n", &["s3"], "not UTF-8"),
            (
                b"CREATE SCHEMA \"s3;\n-- never closed\n",
                &["s3"],
                "does not end",
            ),
            (b"CREATE SCHEMA \"s\0\";\n", &["s\0"], "a NUL"),
        ] {
            let got = schemas_made(sql, &entries(names));
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{names:?}: {got:?}"
            );
        }
        // Two schemas listed alike take two entries (an attacker's: one entry made three).
        let alike = "CREATE SCHEMA \"a b\";\nCREATE SCHEMA \"a\nb\";\n";
        assert_eq!(
            made(alike, &["a b", "a b"]),
            Ok(vec!["a\nb".to_string(), "a b".into()])
        );
        assert!(made(alike, &["a b"]).is_err_and(|e| e.contains("more schemas listed as a b")));
        assert!(
            made("CREATE SCHEMA \"a b\";\n", &["a b", "a b"])
                .is_err_and(|e| e.contains("make nothing for SCHEMA"))
        );
        // Names beyond ASCII are read in a UTF8 dump only (the header names the encoding).
        let latin1 = "SET client_encoding = 'LATIN1';\n";
        assert!(
            made(&format!("{latin1}CREATE SCHEMA \"Ã©\";\n"), &["Ã©"])
                .is_err_and(|e| e.contains("encoded in LATIN1"))
        );
        assert_eq!(
            made(&format!("{latin1}CREATE SCHEMA s3;\n"), &["s3"]),
            Ok(vec!["s3".to_string()])
        );
        let utf8 = "SET client_encoding = 'UTF8';\n";
        assert_eq!(
            made(&format!("{utf8}CREATE SCHEMA \"é\";\n"), &["é"]),
            Ok(vec!["é".to_string()])
        );
        // An entry's SQL does not name the encoding: the header did.
        assert!(made(&format!("{latin1}{utf8}CREATE SCHEMA \"é\";\n"), &["é"]).is_err());
        // Two names alike in their first 63 bytes are one to PostgreSQL.
        let (a, b) = ("s".repeat(63) + "a", "s".repeat(63) + "b");
        let sql = format!("CREATE SCHEMA {a};\nCREATE SCHEMA {b};\n");
        assert!(made(&sql, &[&a, &b]).is_err_and(|e| e.contains("more than 63 bytes")));
        let longest = "s".repeat(63);
        assert_eq!(
            made(&format!("CREATE SCHEMA {longest};\n"), &[&longest]),
            Ok(vec![longest.clone()])
        );
        // A quoted name over many lines is read in one pass (its quotes counted once).
        let lines = format!("CREATE SCHEMA \"a{}\";\n", "\n".repeat(60_000));
        assert!(made(&lines, &["a"]).is_err_and(|e| e.contains("more than 63 bytes")));
        let long = format!("CREATE SCHEMA s3;\n-- {}\n", "x".repeat(MAX_TOC_LINE));
        assert!(made(&long, &["s3"]).is_err_and(|e| e.contains("longer")));
    }

    #[test]
    fn what_needs_more_than_the_application_role_is_refused_by_name() {
        let toc = format!(
            "{TOC}\
218; 1255 16398 FUNCTION public evil() postgres
217; 1259 16399 MATERIALIZED VIEW public mv postgres
3361; 0 16399 MATERIALIZED VIEW DATA public mv postgres
220; 1255 16401 PROCEDURAL LANGUAGE - plpython3u postgres
221; 3466 16402 EVENT TRIGGER - et postgres
222; 2328 16404 FOREIGN DATA WRAPPER - fdw app
223; 2605 16405 TRANSFORM - TRANSFORM FOR integer LANGUAGE sql app
224; 0 0 SOMETHING NEW public x app
"
        );
        let Err(TocError::Refused(Refusals {
            named: why,
            more: 0,
        })) = judge_with(&toc, &[])
        else {
            panic!("refused, each named")
        };
        let joined = why.join("\n");
        for expect in [
            "FUNCTION public.evil() (owned by postgres, not by the application role app)",
            "MATERIALIZED VIEW public.mv (owned by postgres",
            "MATERIALIZED VIEW DATA public.mv (owned by postgres",
            "PROCEDURAL LANGUAGE plpython3u (a kind of object the application role cannot create)",
            "EVENT TRIGGER et (a kind",
            "FOREIGN DATA WRAPPER fdw (a kind",
            "TRANSFORM TRANSFORM FOR integer LANGUAGE sql (a kind",
            "SOMETHING SOMETHING NEW public x app (a kind",
        ] {
            assert!(joined.contains(expect), "{expect:?} in\n{joined}");
        }
        assert_eq!(why.len(), 8, "{joined}");
    }

    #[test]
    fn only_regobox_own_entries_are_its_own() {
        // A schema "regobox " (trailing space) prints as "regobox  init_scripts": the
        // application's, loaded.
        let toc = "\
214; 1259 16386 TABLE regobox  init_scripts app
3358; 0 16386 TABLE DATA regobox  init_scripts app
6; 2615 16385 SCHEMA - regobox  app
215; 1259 16390 TABLE regobox other postgres
";
        let load = judge_with(toc, &[]);
        let Err(TocError::Refused(Refusals { named: why, .. })) = load else {
            panic!("{load:?}")
        };
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].starts_with("TABLE regobox.other (owned by postgres"),
            "{why:?}"
        );
        let three: Vec<&str> = toc.lines().take(3).collect();
        let load = judge_with(&three.join("\n"), &[]).unwrap();
        assert_eq!(load.list.lines().count() + load.schemas.lines().count(), 3);
        assert!(load.own.is_empty());
        assert!(!load.init_scripts_rows);
    }

    #[test]
    fn copy_rows_are_decoded() {
        let text = "SET x = 1;\nCOPY regobox.init_scripts (name, sha256, applied_at) FROM stdin;\n10_a.sql\tab12\t2026-01-01 00:00:00+00\nx\\ty\t\\N\tz\\\\\n\\.\n";
        assert_eq!(
            copy_rows(text).unwrap(),
            vec![
                vec![
                    Some("10_a.sql".into()),
                    Some("ab12".into()),
                    Some("2026-01-01 00:00:00+00".into())
                ],
                vec![Some("x\ty".into()), None, Some("z\\".into())],
            ]
        );
    }

    /// Attack (twenty-sixth session): a dump whose table of contents has an entry of a 700 MiB
    /// name (24 KB compressed) made a restore's check hold 4 GB, and its refusal printed the
    /// name. A line is read up to a bound, the whole too, and a refusal names 20 entries,
    /// each shortened, then counts the rest.
    #[test]
    fn a_table_of_contents_is_read_within_bounds_and_its_refusal_is_short() {
        let long = format!("7; 0 0 TABLE public {} app\n", "a".repeat(MAX_TOC_LINE));
        let toc = format!("{TOC}{long}");
        let Err(TocError::Unreadable(why)) = judge_with(&toc, &[]) else {
            panic!("a line over the bound is refused")
        };
        let number = TOC.lines().count() + 1;
        assert!(
            why.contains(&format!("(line {number})")) && why.contains("64 KiB"),
            "{why}"
        );
        // Just under the bound: an entry like any other (refused here for its owner).
        let name = "b".repeat(MAX_TOC_LINE - 40);
        let under = format!("{TOC}8; 0 0 TABLE public {name} postgres\n");
        let Err(TocError::Refused(r)) = judge_with(&under, &[]) else {
            panic!("read, and judged")
        };
        assert!(r.to_string().len() < 400, "shortened");
        // Many refused entries: 20 named, the rest counted.
        let many: String = (0..1000)
            .map(|i| format!("{i}; 0 0 EVENT TRIGGER - e{i} app\n"))
            .collect();
        let Err(TocError::Refused(r)) = judge_with(&many, &[]) else {
            panic!("refused")
        };
        assert_eq!((r.named.len(), r.more), (20, 980));
        assert!(r.to_string().ends_with("; and 980 more"), "{r}");
        // Not UTF-8: refused, not read as nothing.
        let mut bytes = TOC.as_bytes().to_vec();
        bytes.extend_from_slice(b"9; 0 0 TABLE public \xff app\n");
        let judged = judge_reader(
            &bytes[..],
            &Judge {
                owner: "app",
                extensions: &[],
            },
        );
        assert!(
            matches!(&judged, Err(TocError::Unreadable(why)) if why.contains("not UTF-8")),
            "{judged:?}"
        );
    }

    #[test]
    fn a_table_of_contents_longer_than_the_bound_is_refused() {
        struct Endless(u64);
        impl std::io::Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let line = b"1; 0 0 TABLE public t app\n";
                let n = buf.len() / line.len() * line.len();
                for c in buf[..n].chunks_mut(line.len()) {
                    c.copy_from_slice(line);
                }
                self.0 += n as u64;
                Ok(n)
            }
        }
        // The bound of a restore (256 MiB) read in a debug build takes a core most of a
        // minute: the same reading with a bound of 4 MiB.
        const MAX: u64 = 4 << 20;
        let mut endless = Endless(0);
        let judged = judge_within(
            std::io::BufReader::new(&mut endless),
            &Judge {
                owner: "app",
                extensions: &[],
            },
            MAX,
        );
        assert!(
            matches!(&judged, Err(TocError::Unreadable(why)) if why.contains("longer than 4 MiB")),
            "{:?}",
            judged.map(|_| ())
        );
        assert!(endless.0 <= MAX + (64 << 10), "read no further");
    }
}
