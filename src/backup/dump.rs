//! What a restore loads from a dump, judged entry by entry on its table of contents.
//!
//! A dump is untrusted input: `pg_restore` runs what it holds with the rights of the role it
//! connects as. A restore therefore connects as the application role (never the superuser), and
//! before it loads anything reads the dump's header and table of contents itself, as
//! `pg_restore` reads them ([`super::toc`]), into [`Entry`]s, and decides, for each, one of four things
//! (what `pg_restore` is then given is regobox's own list of the ids it loads, and what it
//! applies whatever the list, the dump's `ENCODING`, `STDSTRINGS` and `SEARCHPATH` entries,
//! must be what pg_dump writes):
//!
//! - loaded by the application role: the kinds of object an owner of the database can create
//!   ([`LOADED`]), owned in the dump by the archive's application role;
//! - made by regobox from what their definitions say, none of whose SQL runs: the dump's schemas
//!   ([`schema_made`]: their names, made first, owned by the application role);
//! - regobox's own: the configured extensions (regobox creates them first, as the superuser) and
//!   the `regobox` schema (its bookkeeping, rebuilt by regobox from its own definition);
//!   another extension is created by the application role (the server allows trusted ones only);
//! - refused, each named: every other kind (procedural languages, event triggers, foreign data
//!   wrappers, ...) and objects owned by another role (made with rights the application role
//!   does not have).
//!
//! The server is the second wall: whatever the list lets through runs without the superuser's
//! rights (a function calling `COPY ... TO PROGRAM` fails when a materialized view refreshes).

pub use super::toc::{Entry, shortened};
#[cfg(test)]
use super::toc::{MAX_ENTRIES, MAX_TOC_TEXT};
use super::toc::{MAX_TOC, NAMED_LEN, ReadError, Toc, shorten};

/// The kinds of entry the application role loads (pg_dump's names of them).
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
    // Made by regobox under the names their definitions give (see [`schema_made`]).
    "SCHEMA",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "SEQUENCE SET",
    "SHELL TYPE",
    "STATISTICS",
    "TABLE",
    "TABLE ATTACH",
    "TABLE DATA",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TRIGGER",
    "TYPE",
    "VIEW",
];

/// regobox's own schema in the application database (see `bootstrap::run_init_scripts`).
pub const OWN_SCHEMA: &str = "regobox";

/// Owners that are not a role of the dump's: a schema owned by whoever owns the database.
const DATABASE_OWNER: &str = "pg_database_owner";

/// What to do with a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// The dump's schemas, made by regobox itself under the names their definitions give
    /// ([`schema_made`]) before anything else loads (sorted).
    pub schemas: Vec<String>,
    /// The `--use-list` of the application role's `pg_restore`: everything else, by id.
    pub list: String,
    /// Entries left to regobox (configured extensions, its own schema).
    pub own: Vec<Entry>,
    /// The configured extensions the dump holds, each with the schema it is created in
    /// ([`extension_schema`]).
    pub extensions: Vec<(String, String)>,
    /// Whether the dump holds rows of `regobox.init_scripts`.
    pub init_scripts_rows: bool,
    /// Those rows, as regobox reads them (see [`init_script_rows`]).
    pub init_scripts: Vec<InitScript>,
}

/// A row of `regobox.init_scripts`: a script applied (its file's name), its SHA-256, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitScript {
    pub name: String,
    pub sha256: String,
    pub applied_at: String,
}

/// The rows of `regobox.init_scripts` in a dump's data for it (COPY's text: a row a line, its
/// fields separated by tabs and escaped, then `\.`), read as regobox writes them, for `backup
/// verify`, the restore and the backup alike: three fields, a file's name (at most 255 bytes,
/// no `/`, no NUL, once: the table's key), a SHA-256 in hex, a time as pg_dump writes it (ISO,
/// years 1 to 9999, an offset PostgreSQL reads). Anything else is refused: what the restore
/// inserted otherwise failed after verify said OK (a time chrono reads and PostgreSQL does
/// not, a NUL, a name past the key's size), or grew (a time replaced by the restore's: the
/// restored record past what a backup may hold); an attacker's, thirty-third session.
pub fn init_script_rows(data: &[u8]) -> Result<Vec<InitScript>, String> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(data).map_err(|_| "is not UTF-8".to_string())?;
    if !text.split('\n').any(|l| l == "\\.") {
        return Err("ends without COPY's end mark".into());
    }
    let mut rows = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut lines = text.split('\n');
    for line in lines.by_ref() {
        if line == "\\." {
            break;
        }
        let fields: Vec<Option<String>> = line
            .split('\t')
            .map(unescape_field)
            .collect::<Result<_, _>>()?;
        let [Some(name), Some(sha256), Some(applied_at)] = <[Option<String>; 3]>::try_from(fields)
            .map_err(|f| {
                format!(
                    "has a row of {} fields, not (name, sha256, applied_at)",
                    f.len()
                )
            })?
        else {
            return Err("has a row without a name, a hash or a time".into());
        };
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) {
            return Err(format!("has {}, not a file's name", shortened(&name)));
        }
        // (Lower case: a start compares it with its own, written so.)
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(format!(
                "has {} for the hash of {}, not a SHA-256",
                shortened(&sha256),
                shortened(&name)
            ));
        }
        if !is_dumped_time(&applied_at) {
            return Err(format!(
                "has {} for the time of {}, not one as pg_dump writes it",
                shortened(&applied_at),
                shortened(&name)
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("names {} twice", shortened(&name)));
        }
        rows.push(InitScript {
            name,
            sha256,
            applied_at,
        });
    }
    if lines.any(|l| !l.is_empty()) {
        return Err("has rows after COPY's end mark".into());
    }
    Ok(rows)
}

/// A `timestamptz` as pg_dump writes it (its sessions are `DateStyle = ISO`):
/// `YYYY-MM-DD HH:MM:SS[.f...]±HH[:MM[:SS]]`, a year from 1 to 9999, a date and a time that are
/// ones, and an offset PostgreSQL reads (under 16 hours).
fn is_dumped_time(t: &str) -> bool {
    // The offset: after the last `+` or `-`, past the date.
    let Some(sign) = t.rfind(['+', '-']).filter(|&i| i > 10) else {
        return false;
    };
    let (when, offset) = (&t[..sign], &t[sign + 1..]);
    let parts: Vec<&str> = offset.split(':').collect();
    let offset_ok = (1..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|d| d.is_ascii_digit()))
        && parts[0] < "16"
        && parts[1..].iter().all(|p| *p < "60");
    let b = when.as_bytes();
    let shape = b.len() >= 19
        && b.len() <= 26
        && b[..4].iter().all(u8::is_ascii_digit)
        && (b[4], b[7], b[10], b[13], b[16]) == (b'-', b'-', b' ', b':', b':')
        && (b.len() == 19 || (b.len() > 20 && b[19] == b'.'));
    let Ok(local) = chrono::NaiveDateTime::parse_from_str(when, "%Y-%m-%d %H:%M:%S%.f") else {
        return false;
    };
    // The instant, in UTC, within the years 1 to 9999 too (a time at an offset of 15 hours in
    // 9999 is one of 10000 in UTC, which the next backup writes so: a fourth attacker's, the
    // same session).
    let seconds: i64 = parts
        .iter()
        .zip([3600, 60, 1])
        .map(|(p, unit)| p.parse::<i64>().unwrap_or(0) * unit)
        .sum();
    let sign = if t.as_bytes()[sign] == b'-' { -1 } else { 1 };
    let utc = local - chrono::TimeDelta::seconds(sign * seconds);
    offset_ok
        && shape
        && (1..=9999).contains(&chrono::Datelike::year(&local))
        && (1..=9999).contains(&chrono::Datelike::year(&utc))
}

/// The most data of `regobox.init_scripts` a dump may hold (a row a script: a name, a hash, a
/// time). regobox reads it itself, after the stop; an attacker's 2.7 KB archive held 108 MB.
pub const INIT_SCRIPTS_DATA_MAX: u64 = 512 << 10;

/// Who loads, and what regobox creates itself.
pub struct Judge<'a> {
    /// The role that owned the application's objects in the dump (the archive's `user`).
    pub owner: &'a str,
    /// `postgres.extensions`.
    pub extensions: &'a [String],
    /// The newest format the `pg_restore` at hand reads ([`max_format`]).
    pub max_format: u8,
}

/// The newest custom format (1.`n`) the `pg_restore` of PostgreSQL `major` reads: 1.13 from
/// PostgreSQL 11, 1.14 from 12, 1.15 from 16, 1.16 from 17.
pub fn max_format(major: u32) -> u8 {
    match major {
        17.. => 16,
        16 => 15,
        12..=15 => 14,
        _ => 13,
    }
}

/// Refusals named in a refusal's message; the rest are counted.
const NAMED: usize = 20;

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

/// What refuses a dump on its header and table of contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TocError {
    /// Entries the application role cannot load.
    #[error("{0}")]
    Refused(Refusals),
    /// A header regobox does not read (see [`super::toc::read_header`]).
    #[error("its header {0}")]
    Header(String),
    /// A table of contents regobox does not read (bounded, as `pg_restore` reads it).
    #[error("its table of contents {0}")]
    Unreadable(String),
    /// Data regobox does not read (see `toc::Toc::read_data`).
    #[error("its data {0}")]
    Data(String),
    /// Schemas regobox cannot make (see [`schema_made`]).
    #[error("the definitions of its schemas {0}")]
    Schemas(String),
    /// A configured extension's definition regobox does not take (see [`extension_schema`]).
    #[error("the definition of extension {name} {why}")]
    Extension { name: String, why: String },
}

impl From<ReadError> for TocError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Header(why) => TocError::Header(why),
            ReadError::Unreadable(why) => TocError::Unreadable(why),
            ReadError::Data(why) => TocError::Data(why),
        }
    }
}

/// Decide, entry by entry, what the application role loads (see the module documentation),
/// reading the dump `dump` as it streams, its header, its table of contents and its data as
/// `pg_restore` reads them ([`super::toc::Toc`]; the data's blocks passed over): a text of an entry is read up to
/// [`super::toc::MAX_TOC_TEXT`], the whole up to [`MAX_TOC`], and only what the load needs is kept (the
/// ids it loads, the first refusals), so that no dump makes a reader hold more.
pub fn judge_reader(dump: impl std::io::Read, judge: &Judge<'_>) -> Result<Load, TocError> {
    judge_within(dump, judge, MAX_TOC)
}

/// The rows of `regobox.init_scripts` in the dump `dump`, read as `backup verify` and the
/// restore read them (see [`init_script_rows`]): for a backup, which fails rather than write an
/// archive no restore takes (the application role records the scripts it runs, so may write
/// rows: an attacker's, thirty-third session, made every backup exit 0 with an archive verify
/// refused).
pub fn init_scripts_of(mut dump: impl std::io::Read) -> Result<Vec<InitScript>, TocError> {
    let mut toc = Toc::read(&mut dump, MAX_TOC)?;
    let mut record = None;
    while let Some(entry) = toc.next_entry()? {
        if is_own_schema(&entry) && entry.kind == "TABLE DATA" && entry.name == "init_scripts" {
            record = Some((entry.id, INIT_SCRIPTS_DATA_MAX));
        }
    }
    init_script_rows(&toc.read_data(record)?)
        .map_err(|why| TocError::Data(format!("of regobox.init_scripts {why}")))
}

/// [`judge_reader`] with the whole's bound `max` (a test's smaller one reads less).
fn judge_within(
    mut dump: impl std::io::Read,
    judge: &Judge<'_>,
    max: u64,
) -> Result<Load, TocError> {
    use std::collections::HashSet;
    let mut toc = Toc::read(&mut dump, max)?;
    if toc.format().minor > judge.max_format {
        return Err(TocError::Header(format!(
            "says format 1.{}, newer than this PostgreSQL's pg_restore reads (1.{})",
            toc.format().minor,
            judge.max_format
        )));
    }
    let mut schemas: HashSet<String> = HashSet::new();
    let mut ids = HashSet::new();
    let mut list = String::new();
    let mut own = Vec::new();
    let mut refused = Refusals::default();
    let mut init_scripts_rows = false;
    let mut settings = Settings::default();
    while let Some(entry) = toc.next_entry()? {
        // `--use-list` selects by id, and `pg_restore` finds an entry by its id: pg_dump
        // numbers each entry once (a second attacker's, twenty-eighth session: a SCHEMA entry
        // sharing a table's id ran its definition in the load, as the application role).
        if !ids.insert(entry.id) {
            refused.push(format!(
                "{} (its id {} is another entry's too)",
                entry.describe(),
                entry.id
            ));
            continue;
        }
        if settings.read(&entry).map_err(TocError::Unreadable)? {
            continue;
        }
        if skipped(&entry) {
            continue;
        }
        if is_own_schema(&entry) {
            if entry.kind == "TABLE DATA" && entry.name == "init_scripts" {
                if init_scripts_rows {
                    refused.push(format!("{} (twice in the dump)", entry.describe()));
                    continue;
                }
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
                list.push_str(&entry.listed());
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
            if let Some(name) = schema_made(&entry).map_err(TocError::Schemas)? {
                if !schemas.insert(name.clone()) {
                    return Err(TocError::Schemas(format!(
                        "make schema {} twice",
                        shortened(&name)
                    )));
                }
            }
            continue;
        }
        list.push_str(&entry.listed());
    }
    toc.dependencies_within()?;
    if !refused.is_empty() {
        return Err(TocError::Refused(refused));
    }
    // The data, read to its end (see `Toc::read_data`), the rows of `regobox.init_scripts`,
    // which regobox reads itself after the stop, bounded before it.
    let init_scripts = own
        .iter()
        .find(|e| e.kind == "TABLE DATA" && e.name == "init_scripts")
        .map(|e| (e.id, INIT_SCRIPTS_DATA_MAX));
    let init_scripts = init_script_rows(&toc.read_data(init_scripts)?)
        .map_err(|why| TocError::Data(format!("of regobox.init_scripts {why}")))?;
    // The encoding is known once the whole is read (pg_dump writes it first).
    let encoding = settings.encoding.as_deref().unwrap_or("UTF8");
    for name in &schemas {
        name_read_in(name, encoding)
            .map_err(|why| TocError::Schemas(format!("make a schema whose {why}")))?;
    }
    let mut schemas: Vec<String> = schemas.into_iter().collect();
    schemas.sort_unstable();
    let extensions = own
        .iter()
        .filter(|e| e.kind == "EXTENSION")
        .map(|e| {
            let definition = e.definition.as_deref().unwrap_or_default();
            extension_schema(definition, &e.name, encoding, &schemas)
                .map(|schema| (e.name.clone(), schema))
                .map_err(|why| TocError::Extension {
                    name: shortened(&e.name),
                    why,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Load {
        schemas,
        list,
        own,
        extensions,
        init_scripts_rows,
        init_scripts,
    })
}

/// Entries `pg_restore` never restores into an existing database (without `--create`): the
/// database's own, its properties, and the grants, comments and labels on it. In no list.
fn skipped(e: &Entry) -> bool {
    matches!(e.kind.as_str(), "DATABASE" | "DATABASE PROPERTIES")
        || (matches!(e.kind.as_str(), "ACL" | "COMMENT" | "SECURITY LABEL")
            && e.name.starts_with("DATABASE "))
}

/// What a dump's `ENCODING`, `STDSTRINGS` and `SEARCHPATH` entries say: `pg_restore` applies
/// them to every connection, the load's included, whatever its list selects (a third
/// attacker's, twenty-eighth session: a `SEARCHPATH` entry's `CREATE TABLE` ran four times in
/// the load, as the application role). Each must be what pg_dump writes, once.
#[derive(Default)]
struct Settings {
    encoding: Option<String>,
    std_strings: bool,
    search_path: bool,
}

impl Settings {
    /// Whether `e` is one of them (judged: what is wrong, otherwise).
    fn read(&mut self, e: &Entry) -> Result<bool, String> {
        let definition = e.definition.as_deref().unwrap_or_default();
        let (seen, good) = match e.kind.as_str() {
            "ENCODING" => {
                let name = definition
                    .strip_prefix("SET client_encoding = '")
                    .and_then(|d| d.strip_suffix("';\n"))
                    .filter(|n| {
                        !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    });
                let seen = self.encoding.is_some();
                if let Some(name) = name {
                    self.encoding = Some(name.to_string());
                }
                (seen, name.is_some())
            }
            "STDSTRINGS" => (
                std::mem::replace(&mut self.std_strings, true),
                matches!(
                    definition,
                    "SET standard_conforming_strings = 'on';\n"
                        | "SET standard_conforming_strings = 'off';\n"
                ),
            ),
            "SEARCHPATH" => (
                std::mem::replace(&mut self.search_path, true),
                definition.strip_suffix('\n') == Some(SEARCH_PATH_LINE),
            ),
            _ => return Ok(false),
        };
        if seen {
            return Err(format!("has two {} entries", e.kind));
        }
        if !good {
            return Err(format!(
                "has a {} entry that is not what pg_dump writes: {}",
                e.kind,
                shortened(&format!("{definition:?}"))
            ));
        }
        Ok(true)
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

/// The schema a configured extension is created in, as its entry's definition gives it:
/// exactly `CREATE EXTENSION IF NOT EXISTS <name> WITH SCHEMA <schema>;` as `pg_dump` writes it,
/// `<name>` the entry's (`name`), `<schema>` a plain lower-case identifier or one in double
/// quotes, beyond ASCII only in a UTF8 dump (`encoding`, see [`name_read_in`]), and a schema the
/// restored database has: `public` or one of the dump's that regobox makes (`made`, see
/// [`schema_made`]), never PostgreSQL's own (`pg_*`, `information_schema`) or regobox's. regobox
/// creates the extension itself there (the definition never runs). What is wrong, for a
/// message, otherwise.
pub fn extension_schema(
    definition: &str,
    name: &str,
    encoding: &str,
    made: &[String],
) -> Result<String, String> {
    let odd = || {
        "is not `CREATE EXTENSION IF NOT EXISTS <name> WITH SCHEMA <schema>;` as pg_dump writes it"
            .to_string()
    };
    let statement = definition
        .strip_prefix("CREATE EXTENSION IF NOT EXISTS ")
        .and_then(|s| s.strip_suffix(";\n"))
        .ok_or_else(odd)?;
    // The extension's name: in quotes (to their end), or to the next space.
    let len = if statement.starts_with('"') {
        written_name_len(statement).ok_or_else(odd)?
    } else {
        statement.find(' ').ok_or_else(odd)?
    };
    let (extension, rest) = statement.split_at(len);
    if identifier(extension).as_deref() != Some(name) {
        return Err(format!(
            "creates extension {}, not its entry's",
            shortened(extension)
        ));
    }
    let written = rest.strip_prefix(" WITH SCHEMA ").ok_or_else(odd)?;
    let schema = identifier(written).ok_or_else(|| {
        format!(
            "names its schema {} (not an identifier as pg_dump writes one)",
            shortened(written)
        )
    })?;
    name_read_in(&schema, encoding)?;
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
/// entry is in no list (regobox judges it as it reads it, see `Settings`), and `pg_restore` runs its SQL
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

/// The schema a dump's `SCHEMA` entry makes, as its definition gives it: `CREATE SCHEMA
/// <name>;` as pg_dump writes it (`<name>` as [`identifier`] reads one), the entry's own name;
/// `None` for `public`, which is there already (pg_dump writes a comment for it, or makes it
/// again). Never PostgreSQL's own schemas or regobox's, nor a name PostgreSQL would not keep as
/// it is. regobox makes the schema itself, as the superuser for the application role, and none
/// of the definition runs; read by a restore's check before anything changes, so that a dump
/// whose schemas could not be made is refused before a service stops (an attacker's,
/// twenty-seventh session: two entries of one name, a `pg_` name, failed the load after the
/// stop). What is wrong, for a message, otherwise.
pub fn schema_made(e: &Entry) -> Result<Option<String>, String> {
    let definition = e.definition.as_deref().unwrap_or_default();
    let Some(statement) = definition.strip_prefix("CREATE SCHEMA ") else {
        if e.name == "public" && (definition.is_empty() || definition.starts_with("--")) {
            return Ok(None);
        }
        return Err(format!(
            "make nothing for SCHEMA {} (no `CREATE SCHEMA <name>;`)",
            shortened(&e.name)
        ));
    };
    let name = statement
        .strip_suffix(";\n")
        .and_then(identifier)
        .ok_or_else(|| {
            format!(
                "hold `CREATE SCHEMA {}`, not `CREATE SCHEMA <name>;` as pg_dump writes it",
                shortened(statement.trim_end())
            )
        })?;
    if reserved(&name) {
        return Err(format!(
            "make {} (PostgreSQL's or regobox's own schema)",
            shortened(&name)
        ));
    }
    if name != e.name {
        return Err(format!(
            "make schema {}, which its entry names {}",
            shortened(&name),
            shortened(&e.name)
        ));
    }
    // What PostgreSQL would not keep as it is: it cuts a name at 63 bytes (two names alike up
    // to there are one). No dump holds one.
    if name.len() > MAX_NAME {
        return Err(format!(
            "make schema {}, a name PostgreSQL does not hold (more than {MAX_NAME} bytes)",
            shortened(&name)
        ));
    }
    Ok((name != "public").then_some(name))
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
    use super::super::toc::write::*;
    use super::*;

    /// An identifier as pg_dump writes it, for a definition.
    fn written(name: &str) -> String {
        if plain(name) {
            name.to_string()
        } else {
            format!("\"{}\"", name.replace('"', "\"\""))
        }
    }

    /// The entries of lines as `pg_restore --list` prints them (a test's way to write a table
    /// of contents): a schema's definition is pg_dump's, any other's a statement.
    fn entries_of(toc: &str) -> Vec<Entry> {
        toc.lines()
            .filter_map(|l| parse_line(l).unwrap())
            .map(|mut e| {
                e.definition = Some(match (e.kind.as_str(), e.name.as_str()) {
                    ("SCHEMA", "public") => {
                        "-- *not* creating schema, since initdb creates it\n".into()
                    }
                    ("SCHEMA", name) => format!("CREATE SCHEMA {};\n", written(name)),
                    ("EXTENSION", name) => format!(
                        "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA public;\n",
                        written(name)
                    ),
                    _ => "SELECT 1;\n".into(),
                });
                e
            })
            .collect()
    }

    /// [`judge_reader`] on a dump whose table of contents `pg_restore --list` prints as `toc`.
    fn judge(toc: &str, judge: &Judge<'_>) -> Result<Load, TocError> {
        judge_reader(&dump_of(&entries_of(toc))[..], judge)
    }

    /// Kinds known only to be refused, for the lines below (any kind not listed is refused too).
    const REFUSED: &[&str] = &[
        "ACCESS METHOD",
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

    /// One line of `pg_restore --list`: `<id>; <catalog oid> <oid> <kind> <schema> <name> <owner>`.
    fn parse_line(line: &str) -> Result<Option<Entry>, String> {
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.trim().is_empty() || trimmed.starts_with(';') {
            return Ok(None);
        }
        let bad = || format!("cannot read line {trimmed:?}");
        let (id, rest) = trimmed.split_once("; ").ok_or_else(bad)?;
        let id: u32 = id.parse().map_err(|_| bad())?;
        let mut rest = rest;
        for _ in 0..2 {
            rest = rest.split_once(' ').ok_or_else(bad)?.1;
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
            let word = rest.split(' ').next().unwrap_or_default().to_string();
            return Ok(Some(Entry {
                id,
                kind: word,
                schema: "-".into(),
                name: rest.into(),
                owner: String::new(),
                definition: None,
            }));
        };
        let tail = &rest[kind.len() + 1..];
        let (schema, tail) = tail.split_once(' ').ok_or_else(bad)?;
        let (name, owner) = tail.rsplit_once(' ').ok_or_else(bad)?;
        Ok(Some(Entry {
            id,
            kind,
            schema: schema.into(),
            name: name.into(),
            owner: owner.into(),
            definition: None,
        }))
    }

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
                max_format: 16,
            },
        )
    }

    #[test]
    fn the_application_role_loads_its_own_objects_and_regobox_keeps_its_own() {
        let load = judge_with(TOC, &["uuid-ossp"]).unwrap();
        // By id alone: `pg_restore` reads nothing else of a line of its list.
        assert_eq!(load.list, "215\n3369\n216\n3360\n219\n");
        assert_eq!(
            load.extensions,
            vec![("uuid-ossp".to_string(), "public".to_string())]
        );
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
            format!("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA {schema};\n")
        };
        let read = |schema: &str| extension_schema(&sql(schema), "uuid-ossp", "UTF8", &made);
        assert_eq!(read("public"), Ok("public".into()));
        assert_eq!(read("s3"), Ok("s3".into()));
        assert_eq!(read("\"s3\""), Ok("s3".into()));
        // Made by regobox under the names the schemas' definitions give.
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
        for (definition, why) in [
            ("CREATE EXTENSION \"uuid-ossp\";\n", "as pg_dump writes it"),
            (
                "CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA public;",
                "as pg_dump writes it",
            ),
            (
                "CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA public;\nSELECT 1;\n",
                "not an identifier",
            ),
            (
                "CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public;\n",
                "creates extension pgcrypto, not its entry's",
            ),
            (
                "CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" SCHEMA public;\n",
                "as pg_dump writes it",
            ),
        ] {
            let got = extension_schema(definition, "uuid-ossp", "UTF8", &made);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {got:?}"
            );
        }
        // A schema's name over two lines (an attacker's: refused, as its line was read alone).
        let made = ["e\nx".to_string(), "é".to_string()];
        assert_eq!(
            extension_schema(
                "CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA \"e\nx\";\n",
                "pgcrypto",
                "UTF8",
                &made
            ),
            Ok("e\nx".into())
        );
        let in_schema = "CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA \"é\";\n";
        assert!(
            extension_schema(in_schema, "pgcrypto", "LATIN1", &made)
                .is_err_and(|e| e.contains("encoded in LATIN1"))
        );
        assert_eq!(
            extension_schema(in_schema, "pgcrypto", "UTF8", &made),
            Ok("é".into())
        );
        // Judged with the table of contents: a configured extension's definition that regobox
        // does not take refuses the dump, naming it.
        let mut entries = entries_of(TOC);
        for e in &mut entries {
            if e.kind == "EXTENSION" {
                e.definition = Some(sql("nowhere"));
            }
        }
        let judged = judge_reader(
            &dump_of(&entries)[..],
            &Judge {
                owner: "app",
                extensions: &["uuid-ossp".to_string()],
                max_format: 16,
            },
        );
        assert_eq!(
            judged.map(|_| ()).unwrap_err().to_string(),
            "the definition of extension uuid-ossp puts it in schema nowhere, which the dump does not make"
        );
    }

    /// A dump of a format newer than the `pg_restore` at hand reads is refused with its header.
    #[test]
    fn a_format_newer_than_pg_restore_reads_is_refused() {
        let debian = b"15.18".as_slice();
        // A format newer than the pg_restore at hand reads: refused by regobox, as the dump's.
        for (minor, max, refused) in [
            (16, 14, true),
            (15, 14, true),
            (14, 14, false),
            (16, 16, false),
        ] {
            let mut d = header(minor, [b"app", debian, debian]);
            d.extend(int(0));
            let judged = judge_reader(
                &d[..],
                &Judge {
                    owner: "app",
                    extensions: &[],
                    max_format: max,
                },
            );
            assert_eq!(
                judged.is_err_and(|e| e
                    .to_string()
                    .contains(&format!("its header says format 1.{minor}, newer than this PostgreSQL's pg_restore reads (1.{max})"))),
                refused,
                "1.{minor}"
            );
        }
        assert_eq!(
            (max_format(15), max_format(16), max_format(18)),
            (14, 15, 16)
        );
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
    }

    /// A table of contents of more entries than a restore reads is refused before it is read;
    /// one of the most, a million schemas with the dump's ENCODING, is read whole.
    #[test]
    fn more_entries_than_a_restore_reads_are_refused() {
        let toc: String = (0..MAX_ENTRIES - 1)
            .map(|i| format!("{}; 2615 1 SCHEMA - s{i} app\n", i + 6))
            .collect();
        let mut entries = entries_of(&toc);
        let judge = |entries: &[Entry]| {
            judge_reader(
                &dump_of(entries)[..],
                &Judge {
                    owner: "app",
                    extensions: &[],
                    max_format: 16,
                },
            )
        };
        assert_eq!(
            judge(&entries).unwrap().schemas.len(),
            MAX_ENTRIES as usize - 1
        );
        let mut more = entries[0].clone();
        more.id = 1 << 30;
        more.name = "more".into();
        more.definition = Some("CREATE SCHEMA more;\n".into());
        entries.push(more);
        let refused = judge(&entries).map(|_| ()).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "its table of contents says it holds 1000001 entries (regobox reads up to 1000000)"
        );
    }

    /// The dump's schemas, made by regobox from their definitions: each `CREATE SCHEMA <name>;`
    /// as pg_dump writes it, of an entry's name, once; `public` is there already; nothing else
    /// of the definitions is read (none of it runs).
    #[test]
    fn a_dumps_schemas_are_the_names_its_definitions_give() {
        let schema = |id: u32, name: &str, definition: &str| Entry {
            id,
            kind: "SCHEMA".into(),
            schema: "-".into(),
            name: name.into(),
            owner: "app".into(),
            definition: Some(definition.into()),
        };
        let made = |entries: &[Entry]| {
            judge_reader(
                &dump_of(entries)[..],
                &Judge {
                    owner: "app",
                    extensions: &[],
                    max_format: 16,
                },
            )
            .map(|load| load.schemas)
        };
        assert_eq!(
            made(&[
                schema(6, "s3", "CREATE SCHEMA s3;\n"),
                schema(7, "My Data", "CREATE SCHEMA \"My Data\";\n"),
                schema(8, "a\nb", "CREATE SCHEMA \"a\nb\";\n"),
                schema(9, "q\"x", "CREATE SCHEMA \"q\"\"x\";\n"),
                schema(10, "a b", "CREATE SCHEMA \"a b\";\n"),
                schema(
                    11,
                    "public",
                    "-- *not* creating schema, since initdb creates it\n"
                ),
            ]),
            Ok(vec![
                "My Data".to_string(),
                "a\nb".into(),
                "a b".into(),
                "q\"x".into(),
                "s3".into()
            ])
        );
        // `public` made again by its definition: it is there already.
        assert_eq!(
            made(&[
                schema(6, "public", "CREATE SCHEMA public;\n"),
                schema(7, "s3", "CREATE SCHEMA \"s3\";\n")
            ]),
            Ok(vec!["s3".to_string()])
        );
        for (entries, why) in [
            (
                vec![
                    schema(6, "s3", "CREATE SCHEMA s3;\n"),
                    schema(7, "s3", "CREATE SCHEMA s3;\n"),
                ],
                "make schema s3 twice",
            ),
            (
                vec![schema(6, "pg_s", "CREATE SCHEMA pg_s;\n")],
                "own schema",
            ),
            (
                vec![schema(6, "s3", "CREATE SCHEMA regobox;\n")],
                "own schema",
            ),
            (
                vec![schema(
                    6,
                    "information_schema",
                    "CREATE SCHEMA information_schema;\n",
                )],
                "own schema",
            ),
            (
                vec![schema(6, "s3", "CREATE SCHEMA s4;\n")],
                "make schema s4, which its entry names s3",
            ),
            (
                vec![schema(6, "a b", "CREATE SCHEMA \"a\nb\";\n")],
                "which its entry names a b",
            ),
            (
                vec![schema(6, "s3", "SELECT 1;\n")],
                "make nothing for SCHEMA s3",
            ),
            (vec![schema(6, "s3", "")], "make nothing for SCHEMA s3"),
            (
                vec![schema(6, "s3", "-- not made\n")],
                "make nothing for SCHEMA s3",
            ),
            (
                vec![schema(6, "S3", "CREATE SCHEMA S3;\n")],
                "as pg_dump writes it",
            ),
            (
                vec![schema(
                    6,
                    "s3",
                    "CREATE SCHEMA s3 AUTHORIZATION postgres;\n",
                )],
                "as pg_dump writes it",
            ),
            (
                vec![schema(6, "s3", "CREATE SCHEMA s3;\nCREATE TABLE t();\n")],
                "as pg_dump writes it",
            ),
            (
                vec![schema(6, "s3\"x\"", "CREATE SCHEMA \"s3\"x\"\";\n")],
                "as pg_dump writes it",
            ),
            (
                vec![schema(6, "s3", "CREATE SCHEMA s3;")],
                "as pg_dump writes it",
            ),
        ] {
            let got = made(&entries);
            assert!(
                matches!(&got, Err(TocError::Schemas(w)) if w.contains(why)),
                "{why}: {got:?}"
            );
        }
        // Names beyond ASCII are read in a UTF8 dump only (its ENCODING entry says which).
        let latin1 = |entries: &[Entry]| {
            let utf8 = dump_of(entries);
            let (from, to) = (
                text(Some(b"SET client_encoding = 'UTF8';\n")),
                text(Some(b"SET client_encoding = 'LATIN1';\n")),
            );
            let at = utf8.windows(from.len()).position(|w| w == from).unwrap();
            let mut d = utf8[..at].to_vec();
            d.extend(to);
            d.extend_from_slice(&utf8[at + from.len()..]);
            judge_reader(
                &d[..],
                &Judge {
                    owner: "app",
                    extensions: &[],
                    max_format: 16,
                },
            )
            .map(|load| load.schemas)
        };
        assert!(
            latin1(&[schema(6, "Ã©", "CREATE SCHEMA \"Ã©\";\n")])
                .is_err_and(|e| e.to_string().contains("encoded in LATIN1"))
        );
        assert_eq!(
            latin1(&[schema(6, "s3", "CREATE SCHEMA s3;\n")]),
            Ok(vec!["s3".to_string()])
        );
        assert_eq!(
            made(&[schema(6, "é", "CREATE SCHEMA \"é\";\n")]),
            Ok(vec!["é".to_string()])
        );
        // Two names alike in their first 63 bytes are one to PostgreSQL.
        let (a, b) = ("s".repeat(63) + "a", "s".repeat(63) + "b");
        let got = made(&[
            schema(6, &a, &format!("CREATE SCHEMA {a};\n")),
            schema(7, &b, &format!("CREATE SCHEMA {b};\n")),
        ]);
        assert!(got.is_err_and(|e| e.to_string().contains("more than 63 bytes")));
        let longest = "s".repeat(63);
        assert_eq!(
            made(&[schema(6, &longest, &format!("CREATE SCHEMA {longest};\n"))]),
            Ok(vec![longest.clone()])
        );
        // The dump's settings, which `pg_restore` applies whatever its list, are pg_dump's.
        let setting = |kind: &str, definition: &str| Entry {
            id: 5,
            kind: kind.into(),
            schema: "-".into(),
            name: kind.into(),
            owner: String::new(),
            definition: Some(definition.into()),
        };
        for good in [
            setting("STDSTRINGS", "SET standard_conforming_strings = 'on';\n"),
            setting("STDSTRINGS", "SET standard_conforming_strings = 'off';\n"),
            setting("SEARCHPATH", &format!("{SEARCH_PATH_LINE}\n")),
        ] {
            assert_eq!(made(&[good]), Ok(vec![]));
        }
        for (bad, why) in [
            (
                setting(
                    "SEARCHPATH",
                    &format!("{SEARCH_PATH_LINE}\nCREATE TABLE public.ran();\n"),
                ),
                "a SEARCHPATH entry that is not what pg_dump writes",
            ),
            (
                setting(
                    "STDSTRINGS",
                    "SET standard_conforming_strings = 'on'; DROP TABLE t;\n",
                ),
                "a STDSTRINGS entry that is not",
            ),
            (
                setting("ENCODING", "SET client_encoding = 'UTF8';\n"),
                "two ENCODING entries",
            ),
        ] {
            let got = made(&[bad]);
            assert!(
                matches!(&got, Err(TocError::Unreadable(w)) if w.contains(why)),
                "{why}: {got:?}"
            );
        }
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
        assert_eq!(load.list.lines().count() + load.schemas.len(), 3);
        assert!(load.own.is_empty());
        assert!(!load.init_scripts_rows);
    }

    #[test]
    fn init_script_rows_are_read_as_a_restore_inserts_them() {
        let h = "ab".repeat(32);
        let data = format!(
            "10_a.sql\t{h}\t2026-01-01 00:00:00.123456+00\nx\\ty.sql\t{h}\t2026-01-01 01:02:03-05:30\n\\.\n\n\n"
        );
        assert_eq!(
            init_script_rows(data.as_bytes()).unwrap(),
            vec![
                InitScript {
                    name: "10_a.sql".into(),
                    sha256: h.clone(),
                    applied_at: "2026-01-01 00:00:00.123456+00".into(),
                },
                InitScript {
                    name: "x\ty.sql".into(),
                    sha256: h.clone(),
                    applied_at: "2026-01-01 01:02:03-05:30".into(),
                },
            ]
        );
        assert_eq!(init_script_rows(b""), Ok(Vec::new()));
        let t = "2026-01-01 00:00:00+00";
        let long = "n".repeat(256);
        for (data, why) in [
            (format!("a\t{h}\t{t}\n"), "end mark"),
            (format!("a\t{h}\n\\.\n"), "2 fields"),
            (format!("a\t{h}\t{t}\td\n\\.\n"), "4 fields"),
            (format!("\\N\t{h}\t{t}\n\\.\n"), "without a name"),
            (format!("a\t\\N\t{t}\n\\.\n"), "without a name, a hash"),
            (format!("a\t{h}\t\\N\n\\.\n"), "or a time"),
            (format!("a\t{h}\t{t}\na\t{h}\t{t}\n\\.\n"), "names a twice"),
            (format!("a\t{h}\t{t}\n\\.\nd\t{h}\t{t}\n"), "after"),
            // An attacker's (thirty-third session): what verify took and the restore's
            // INSERT refused, or what it restored otherwise (a time replaced grew the record).
            (format!("a\0b\t{h}\t{t}\n\\.\n"), "not a file's name"),
            (format!("{long}\t{h}\t{t}\n\\.\n"), "not a file's name"),
            (format!("a/b\t{h}\t{t}\n\\.\n"), "not a file's name"),
            (
                format!("a\t{}\t{t}\n\\.\n", "\\\\".repeat(64)),
                "not a SHA-256",
            ),
            (format!("a\tab\t{t}\n\\.\n"), "not a SHA-256"),
            (
                format!("a\t{}\t{t}\n\\.\n", h.to_uppercase()),
                "not a SHA-256",
            ),
            (
                format!("a\t{h}\t0000-01-01 00:00:00+00\n\\.\n"),
                "not one as pg_dump",
            ),
            (
                format!("a\t{h}\t2024-01-01 00:00:00+20\n\\.\n"),
                "not one as pg_dump",
            ),
            (format!("a\t{h}\tinfinity\n\\.\n"), "not one as pg_dump"),
            (
                format!("a\t{h}\t2024-02-30 00:00:00+00\n\\.\n"),
                "not one as pg_dump",
            ),
            (
                format!("a\t{h}\t2024-01-01 00:00:00\n\\.\n"),
                "not one as pg_dump",
            ),
            (
                format!("a\t{h}\t2024-01-01T00:00:00+00\n\\.\n"),
                "not one as pg_dump",
            ),
            (
                format!("a\t{h}\t2024-01-01 00:00:00. +00\n\\.\n"),
                "not one as pg_dump",
            ),
        ] {
            let got = init_script_rows(data.as_bytes());
            assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{data:?}: {got:?}"
            );
        }
        assert!(init_script_rows(b"a\xff\tb\tc\n\\.\n").is_err_and(|e| e.contains("UTF-8")));
        for ok in [
            "2026-12-07 10:12:24.615306+00",
            "2026-12-07 10:12:24+05:30",
            "0001-01-02 00:00:00+14:00:00",
            "9999-12-30 23:59:59.9-15:59",
        ] {
            assert!(is_dumped_time(ok), "{ok}");
        }
        // Past the years 1 to 9999 in UTC (a fourth attacker's, the same session).
        for not in ["9999-12-31 23:00:00-15", "0001-01-01 00:00:00+15"] {
            assert!(!is_dumped_time(not), "{not}");
        }
    }

    /// Attack (twenty-sixth session): a dump whose table of contents has an entry of a 700 MiB
    /// name (24 KB compressed) made a restore's check hold 4 GB, and its refusal printed the
    /// name. A text is read up to a bound, the whole too, and a refusal names 20 entries,
    /// each shortened, then counts the rest.
    #[test]
    fn a_table_of_contents_is_read_within_bounds_and_its_refusal_is_short() {
        let long = format!("7; 0 0 TABLE public {} app\n", "a".repeat(MAX_TOC_TEXT + 1));
        let toc = format!("{TOC}{long}");
        let Err(TocError::Unreadable(why)) = judge_with(&toc, &[]) else {
            panic!("a name over the bound is refused")
        };
        let number = TOC.lines().filter(|l| !l.starts_with(';')).count() + 2;
        assert!(
            why.contains(&format!("(entry {number})")) && why.contains("a name of 65537 bytes"),
            "{why}"
        );
        // At the bound: an entry like any other (refused here for its owner).
        let name = "b".repeat(MAX_TOC_TEXT);
        let under = format!("{TOC}8; 0 0 TABLE public {name} postgres\n");
        let Err(TocError::Refused(r)) = judge_with(&under, &[]) else {
            panic!("read, and judged")
        };
        assert!(r.to_string().len() < 400, "shortened");
        // Many refused entries: 20 named, the rest counted.
        let many: String = (0..1000)
            .map(|i| format!("{}; 0 0 EVENT TRIGGER - e{i} app\n", i + 2))
            .collect();
        let Err(TocError::Refused(r)) = judge_with(&many, &[]) else {
            panic!("refused")
        };
        assert_eq!((r.named.len(), r.more), (20, 980));
        assert!(r.to_string().ends_with("; and 980 more"), "{r}");
        // What an archive names is said with its control characters escaped (an attacker's,
        // twenty-ninth session: an escape sequence, and a line of its own in a log).
        let entry = |id, kind: &str, owner: &str| Entry {
            id,
            kind: kind.into(),
            schema: "public".into(),
            name: "f()".into(),
            owner: owner.into(),
            definition: None,
        };
        let judged = judge_reader(
            &dump_of(&[
                entry(5, "FUNCT\x1b[31mION\nEVIL", "app"),
                entry(6, "FUNCTION", "ev\x1b[31mil"),
            ])[..],
            &Judge {
                owner: "app",
                extensions: &[],
                max_format: 16,
            },
        );
        let said = judged.map(|_| ()).unwrap_err().to_string();
        assert!(!said.chars().any(char::is_control), "{said:?}");
        assert!(
            said.contains("FUNCT\\u{1b}[31mION\\nEVIL public.f() (a kind")
                && said.contains("(owned by ev\\u{1b}[31mil, not"),
            "{said}"
        );
    }

    #[test]
    fn a_table_of_contents_longer_than_the_bound_is_refused() {
        /// A dump whose table of contents says it holds a million entries of 64 KiB
        /// definitions each, made as it is read; what was read, counted.
        struct Endless {
            made: Vec<u8>,
            at: usize,
            read: u64,
        }
        impl std::io::Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.at == self.made.len() {
                    let mut e = Entry {
                        id: 0,
                        kind: "TABLE".into(),
                        schema: "public".into(),
                        name: "t".into(),
                        owner: "app".into(),
                        definition: None,
                    };
                    self.made.clear();
                    self.at = 0;
                    e.id = (self.read / 1000) as u32 + 2;
                    let mut b = entry_bytes(14, &e);
                    let define = text(Some(b"SELECT 1;\n"));
                    let at = b.windows(define.len()).position(|w| w == define);
                    if let Some(at) = at {
                        b.splice(at..at + define.len(), text(Some(&[b'x'; 64 << 10])));
                    }
                    self.made = b;
                }
                let n = buf.len().min(self.made.len() - self.at);
                buf[..n].copy_from_slice(&self.made[self.at..self.at + n]);
                self.at += n;
                self.read += n as u64;
                Ok(n)
            }
        }
        // A restore's bound (1 GiB) read in a debug build takes a while: the same reading with
        // a bound of 4 MiB.
        const MAX: u64 = 4 << 20;
        let mut d = header(14, [b"app", b"15", b"15"]);
        d.extend(int(1_000_000));
        let mut endless = Endless {
            made: d,
            at: 0,
            read: 0,
        };
        let judged = judge_within(
            std::io::BufReader::with_capacity(1024, &mut endless),
            &Judge {
                owner: "app",
                extensions: &[],
                max_format: 16,
            },
            MAX,
        );
        assert!(
            matches!(&judged, Err(TocError::Unreadable(why)) if why.contains("longer than 4 MiB")),
            "{:?}",
            judged.map(|_| ())
        );
        assert!(
            endless.read <= MAX + 4096,
            "read no further: {}",
            endless.read
        );
    }
}
