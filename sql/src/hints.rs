//! Planner hints written into a statement, in `pg_hint_plan`'s form: a `/*+ ... */` comment right
//! after a `SELECT` holds hints like `ColumnScan(o)` or `Set(basalt.join_order off)`. They apply to
//! the statement alone (the session's `SET` values stay as they were).
//!
//! This module only reads hints and checks that they name collections the statement reads; the
//! aggregator applies them while it plans.

use std::collections::HashMap;
use std::ops::ControlFlow;

use basalt_common::api::{CollectionName, DEFAULT_WORKSPACE};
use basalt_common::filter::AccessPath;
use basalt_common::{BasaltError, ErrorCode, Result};
use sqlparser::ast::{ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, Visit, Visitor};

/// Hint text over this many bytes is refused (hints are a few words; this bounds the work).
const HINT_BYTES_MAX: usize = 16 * 1024;

/// The settings a `Set(...)` hint may change for one statement.
pub const HINT_SETTINGS: [&str; 4] =
    ["basalt.access_path", "basalt.fragments", "basalt.join_order", "basalt.broadcast"];

/// What a statement's hints ask for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Hints {
    /// A forced access path per collection the statement reads.
    pub access_paths: Vec<(CollectionName, AccessPath)>,
    /// `Set(basalt.access_path ...)`: `Some(None)` is `auto`.
    pub access_path: Option<Option<AccessPath>>,
    /// `Set(basalt.fragments ...)`.
    pub fragments: Option<bool>,
    /// `Set(basalt.join_order ...)`.
    pub join_order: Option<bool>,
    /// `Set(basalt.broadcast ...)`.
    pub broadcast: Option<bool>,
}

impl Hints {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn syntax(message: impl Into<String>) -> BasaltError {
    BasaltError::new(ErrorCode::Syntax, message)
}

/// The access path a scan hint names: Basalt's own names, and `pg_hint_plan`'s for the same
/// things (`SeqScan` reads every row, `IndexScan`/`BitmapScan` go through an index).
fn scan_hint(name: &str) -> Option<AccessPath> {
    match name.to_ascii_lowercase().as_str() {
        "columnscan" | "seqscan" => Some(AccessPath::ColumnScan),
        "searchindex" | "indexscan" | "bitmapscan" => Some(AccessPath::SearchIndex),
        "rowlookup" => Some(AccessPath::RowLookup),
        _ => None,
    }
}

/// `auto` (or `default`) is no forced path.
pub fn parse_access_path(value: &str) -> Result<Option<AccessPath>> {
    match value.to_lowercase().as_str() {
        "auto" | "default" => Ok(None),
        "row_lookup" => Ok(Some(AccessPath::RowLookup)),
        "search_index" => Ok(Some(AccessPath::SearchIndex)),
        "column_scan" => Ok(Some(AccessPath::ColumnScan)),
        other => Err(BasaltError::invalid(format!(
            "unknown access path {other:?} (row_lookup, search_index, column_scan or auto)"
        ))),
    }
}

/// An on/off setting's value.
pub fn parse_on_off(name: &str, value: &str) -> Result<bool> {
    match value.to_lowercase().as_str() {
        "on" | "true" | "1" | "default" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(BasaltError::invalid(format!("{name} is on or off, not {other:?}"))),
    }
}

/// One hint as written: `Name(arg arg ...)`.
#[derive(Debug, PartialEq)]
struct Written {
    name: String,
    args: Vec<String>,
}

/// Split hint text into hints. Arguments are separated by spaces or commas; `"..."` quotes an
/// identifier (`""` is a quote inside it) and `'...'` a value.
fn split(text: &str) -> Result<Vec<Written>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if name.is_empty() || chars.next() != Some('(') {
            return Err(syntax(format!(
                "hint {name:?} must be written as {}(...)",
                if name.is_empty() { "Name" } else { &name }
            )));
        }
        let mut args = Vec::new();
        loop {
            while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
            match chars.peek().copied() {
                None => return Err(syntax(format!("hint {name} has no closing parenthesis"))),
                Some(')') => {
                    chars.next();
                    break;
                }
                Some(quote @ ('"' | '\'')) => {
                    chars.next();
                    let mut arg = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(syntax(format!("hint {name} has an unterminated quote"))),
                            Some(c) if c == quote => {
                                if chars.next_if_eq(&quote).is_some() {
                                    arg.push(quote);
                                } else {
                                    break;
                                }
                            }
                            Some(c) => arg.push(c),
                        }
                    }
                    args.push(arg);
                }
                Some(_) => {
                    let mut arg = String::new();
                    while let Some(c) =
                        chars.next_if(|c| !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '"' | '\''))
                    {
                        arg.push(c);
                    }
                    if arg.is_empty() {
                        return Err(syntax(format!(
                            "unexpected {:?} in hint {name}",
                            chars.peek().copied().unwrap_or(' ')
                        )));
                    }
                    args.push(arg);
                }
            }
        }
        out.push(Written { name, args });
    }
}

/// The hint texts of every `SELECT` in a statement (only `/*+ ... */` and `--+` hints with no
/// prefix: `/*abc+ ... */` belongs to another system and is a comment here).
#[derive(Default)]
struct HintTexts(Vec<String>);

impl HintTexts {
    fn set_expr(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(select) => {
                for h in &select.optimizer_hints {
                    if h.prefix.is_empty() {
                        self.0.push(h.text.clone());
                    }
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            // Nested queries are visited as queries of their own.
            _ => {}
        }
    }
}

impl Visitor for HintTexts {
    type Break = ();
    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.set_expr(&query.body);
        ControlFlow::Continue(())
    }
}

/// Collections a statement reads, by each name a hint may use for them: the alias, else the
/// name as written (`c`, `ws.c`, `basalt.ws.c`, and their trailing parts).
#[derive(Default)]
struct Tables(HashMap<String, Vec<CollectionName>>);

fn written_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(i.value.clone()),
            _ => None,
        })
        .collect()
}

/// `c` is in the default workspace, `ws.c` in `ws`, `catalog.ws.c` too; a single identifier
/// with a dot (a quoted `"ws.c"`) is `ws.c`.
fn resolve(parts: &[String]) -> Option<CollectionName> {
    match parts {
        [c] if c.contains('.') => CollectionName::parse(c).ok(),
        [c] => Some(CollectionName::new(DEFAULT_WORKSPACE, c)),
        [ws, c] | [_, ws, c] => Some(CollectionName::new(ws, c)),
        _ => None,
    }
}

impl Visitor for Tables {
    type Break = ();
    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, alias, .. } = factor
            && let Some(parts) = written_parts(name)
            && let Some(collection) = resolve(&parts)
        {
            let keys = match alias {
                Some(a) => vec![a.name.value.clone()],
                None => (0..parts.len()).map(|start| parts[start..].join(".")).collect(),
            };
            for key in keys {
                let entry = self.0.entry(key).or_default();
                if !entry.contains(&collection) {
                    entry.push(collection.clone());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// The hints a statement carries, checked: every scan hint names a collection the statement
/// reads (by alias when it has one), one collection gets one path, and `Set` names a setting
/// hints may change with a valid value.
pub fn statement_hints(stmt: &Statement) -> Result<Hints> {
    let mut texts = HintTexts::default();
    let _ = stmt.visit(&mut texts);
    let mut hints = Hints::default();
    if texts.0.is_empty() {
        return Ok(hints);
    }
    if texts.0.iter().map(String::len).sum::<usize>() > HINT_BYTES_MAX {
        return Err(BasaltError::limit(format!("hints are over {HINT_BYTES_MAX} bytes")));
    }
    let mut tables = Tables::default();
    let _ = stmt.visit(&mut tables);
    for text in &texts.0 {
        for Written { name, args } in split(text)? {
            if let Some(path) = scan_hint(&name) {
                if args.is_empty() {
                    return Err(syntax(format!("hint {name} names no collection: {name}(alias ...)")));
                }
                for arg in &args {
                    let Some(found) = tables.0.get(arg) else {
                        return Err(BasaltError::invalid(format!(
                            "hint {name}({arg}): the statement reads no collection named {arg} (use its alias if it has one)"
                        )));
                    };
                    for collection in found {
                        match hints.access_paths.iter().find(|(c, _)| c == collection) {
                            Some((_, other)) if *other != path => {
                                return Err(BasaltError::invalid(format!(
                                    "hints force both {} and {} on collection {collection}",
                                    other.name(),
                                    path.name()
                                )));
                            }
                            Some(_) => {}
                            None => hints.access_paths.push((collection.clone(), path)),
                        }
                    }
                }
            } else if name.eq_ignore_ascii_case("set") {
                let [setting, value] = args.as_slice() else {
                    return Err(syntax("hint Set takes a setting and a value: Set(basalt.join_order off)"));
                };
                let setting = setting.to_lowercase();
                match setting.as_str() {
                    "basalt.access_path" => hints.access_path = Some(parse_access_path(value)?),
                    "basalt.fragments" => hints.fragments = Some(parse_on_off(&setting, value)?),
                    "basalt.join_order" => hints.join_order = Some(parse_on_off(&setting, value)?),
                    "basalt.broadcast" => hints.broadcast = Some(parse_on_off(&setting, value)?),
                    _ => {
                        return Err(BasaltError::invalid(format!(
                            "hint Set cannot change {setting} (it can change {})",
                            HINT_SETTINGS.join(", ")
                        )));
                    }
                }
            } else {
                return Err(BasaltError::invalid(format!(
                    "unknown hint {name} (ColumnScan, SearchIndex, RowLookup, SeqScan, IndexScan, BitmapScan or Set)"
                )));
            }
        }
    }
    Ok(hints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BasaltStatement, parse};

    fn hints(sql: &str) -> Result<Hints> {
        match parse(sql)?.pop() {
            Some(BasaltStatement::Query(stmt)) => statement_hints(&stmt),
            other => panic!("not a query: {other:?}"),
        }
    }

    fn c(name: &str) -> CollectionName {
        CollectionName::new(DEFAULT_WORKSPACE, name)
    }

    #[test]
    fn reads_scan_hints_by_alias_and_name() {
        let h = hints(
            "SELECT /*+ ColumnScan(o) IndexScan(customers) */ * FROM orders o JOIN customers ON o.c = customers._id",
        )
        .unwrap();
        assert_eq!(
            h.access_paths,
            vec![(c("orders"), AccessPath::ColumnScan), (c("customers"), AccessPath::SearchIndex)]
        );
        assert_eq!((h.access_path, h.fragments, h.join_order), (None, None, None));

        let h = hints("SELECT /*+ RowLookup(shop.items) */ * FROM shop.items WHERE _id = 'a'").unwrap();
        assert_eq!(h.access_paths, vec![(CollectionName::new("shop", "items"), AccessPath::RowLookup)]);
        // The trailing name works too, and names are matched as written.
        let h = hints("SELECT /*+ seqscan(items) */ * FROM shop.items").unwrap();
        assert_eq!(h.access_paths, vec![(CollectionName::new("shop", "items"), AccessPath::ColumnScan)]);
        let h = hints(r#"SELECT /*+ SearchIndex("My Notes") */ * FROM "My Notes""#).unwrap();
        assert_eq!(h.access_paths, vec![(c("My Notes"), AccessPath::SearchIndex)]);
    }

    #[test]
    fn reads_hints_in_subqueries_unions_and_explain() {
        let h = hints("SELECT * FROM a WHERE x IN (SELECT /*+ ColumnScan(b) */ y FROM b)").unwrap();
        assert_eq!(h.access_paths, vec![(c("b"), AccessPath::ColumnScan)]);
        let h = hints("SELECT x FROM a UNION ALL SELECT /*+ SeqScan(b) */ x FROM b").unwrap();
        assert_eq!(h.access_paths, vec![(c("b"), AccessPath::ColumnScan)]);
        let h = hints("EXPLAIN SELECT /*+ Set(basalt.fragments off) */ count(*) FROM a").unwrap();
        assert_eq!(h, Hints { fragments: Some(false), ..Hints::default() });
        let h = hints("SELECT /*+ Set(basalt.broadcast off) */ count(*) FROM a").unwrap();
        assert_eq!(h, Hints { broadcast: Some(false), ..Hints::default() });
    }

    #[test]
    fn reads_settings_and_keeps_the_last_value() {
        let h = hints(
            "SELECT /*+ Set(basalt.join_order off) Set(BASALT.JOIN_ORDER, 'on') Set(basalt.access_path column_scan) */ 1",
        )
        .unwrap();
        assert_eq!(
            h,
            Hints { join_order: Some(true), access_path: Some(Some(AccessPath::ColumnScan)), ..Hints::default() }
        );
        let h = hints("SELECT /*+ Set(basalt.access_path auto) */ 1").unwrap();
        assert_eq!(h, Hints { access_path: Some(None), ..Hints::default() });
    }

    #[test]
    fn plain_and_foreign_comments_are_not_hints() {
        assert!(hints("SELECT /* ColumnScan(a) */ * FROM a").unwrap().is_empty());
        assert!(hints("SELECT /*abc+ ColumnScan(zzz) */ * FROM a").unwrap().is_empty());
        assert!(hints("SELECT * FROM a").unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_hints_with_clear_errors() {
        let e = |sql: &str| hints(sql).unwrap_err();
        let err = e("SELECT /*+ ColumnScan(zzz) */ * FROM a");
        assert_eq!(err.code, ErrorCode::InvalidInput);
        assert!(err.message.contains("no collection named zzz"), "{}", err.message);
        // With an alias, the alias is the name.
        assert!(e("SELECT /*+ ColumnScan(a) */ * FROM a AS t").message.contains("no collection named a"));
        assert!(e("SELECT /*+ FastPlease(a) */ * FROM a").message.contains("unknown hint FastPlease"));
        assert!(
            e("SELECT /*+ ColumnScan(a) SearchIndex(a) */ * FROM a")
                .message
                .contains("both column_scan and search_index")
        );
        assert_eq!(e("SELECT /*+ ColumnScan(a */ * FROM a").code, ErrorCode::Syntax);
        assert_eq!(e("SELECT /*+ ColumnScan */ * FROM a").code, ErrorCode::Syntax);
        assert_eq!(e("SELECT /*+ ColumnScan() */ * FROM a").code, ErrorCode::Syntax);
        assert_eq!(e("SELECT /*+ Set(basalt.fragments) */ * FROM a").code, ErrorCode::Syntax);
        assert!(
            e("SELECT /*+ Set(statement_timeout 1s) */ * FROM a").message.contains("cannot change statement_timeout")
        );
        assert!(e("SELECT /*+ Set(basalt.fragments maybe) */ * FROM a").message.contains("on or off"));
        assert!(e("SELECT /*+ Set(basalt.access_path fastest) */ * FROM a").message.contains("unknown access path"));
        assert_eq!(e(&format!("SELECT /*+ {} */ 1", "Set(a b) ".repeat(3000))).code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn splits_arguments() {
        assert_eq!(
            split(r#" A(x, y  z) b ( "q""uote" 'it''s' ) "#).unwrap(),
            vec![
                Written { name: "A".into(), args: vec!["x".into(), "y".into(), "z".into()] },
                Written { name: "b".into(), args: vec!["q\"uote".into(), "it's".into()] },
            ]
        );
        assert!(split("A(x").is_err());
        assert!(split("(x)").is_err());
        assert!(split("A(\"x)").is_err());
    }
}
