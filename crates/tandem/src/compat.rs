//! Compatibility of payload contracts: which changes between the released
//! JSON Schema of an event and its current one break a reader.
//!
//! A payload contract is a JSON Schema (draft 2020-12, as `schemars`
//! writes it). Within one version of an event, a change must leave every
//! payload readable by old and new consumers alike. [`breaking_changes`]
//! compares the released schema (the baseline) with the current one and
//! lists each change that does not, naming the field and the [`Rule`] it
//! breaks.
//!
//! Compatible changes: adding an optional property; adding or changing
//! `description`, `title`, `examples` or `default`; allowing more enum
//! values; reordering properties or `required`; moving a sub-schema between
//! inline and `$defs` (or `definitions`); renaming a `$defs` entry.
//!
//! The comparison is strict on types: a type set that differs in any way,
//! even one that only gained `null`, is a break. It does not look at
//! numeric bounds, string lengths or patterns, nor at whether unknown
//! properties are allowed (`additionalProperties: false`).

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

/// The rule an incompatible change breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A property of the baseline is gone. A rename shows as this for the
    /// old name, and as a new property for the new one.
    FieldRemoved,
    /// The set of allowed types, the `format`, or the shape (object, array,
    /// scalar, choice of alternatives) differs.
    TypeChanged,
    /// A property optional in the baseline is required now, or a new
    /// property is required.
    FieldMadeRequired,
    /// A property required in the baseline is optional now: old consumers
    /// rely on it being there.
    FieldMadeOptional,
    /// A value the baseline allowed (in an `enum`, a `const` or a choice of
    /// them) is not allowed now.
    EnumNarrowed,
}

impl Rule {
    /// The rule's name for a person, such as `"field removed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::FieldRemoved => "field removed",
            Rule::TypeChanged => "type changed",
            Rule::FieldMadeRequired => "field made required",
            Rule::FieldMadeOptional => "field made optional",
            Rule::EnumNarrowed => "enum narrowed",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One incompatible change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// Where: the path of property names from the payload's root, in the
    /// style `lines[].unitPriceCents` (`[]` stands for an array's items,
    /// `{}` for a map's values). The empty string is the root itself.
    pub field: String,
    /// The rule the change breaks.
    pub rule: Rule,
    /// What changed, for a person: `type "integer" became "string"`,
    /// `value "CANCELLED" no longer allowed`.
    pub detail: String,
}

impl fmt::Display for Break {
    /// `lines[].unitPriceCents: type changed (type "integer" became
    /// "string")`; the root shows as `(root)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "(root)"
        } else {
            &self.field
        };
        write!(f, "{field}: {} ({})", self.rule, self.detail)
    }
}

/// Every incompatible change from `baseline` to `current`, two schemas of
/// the same event and version, ordered by field path, then rule, then
/// detail. Empty: the change is compatible.
///
/// `$ref`s (`#/$defs/X`, `#/definitions/X`, any `#` pointer) are resolved
/// against the root of their own document, so where a sub-schema lives
/// does not matter. Type sets are compared strictly: `["string", "null"]`
/// against `"string"` is a [`Rule::TypeChanged`].
pub fn breaking_changes(baseline: &Value, current: &Value) -> Vec<Break> {
    let mut walk = Walk {
        baseline,
        current,
        on_path: Vec::new(),
        breaks: Vec::new(),
    };
    walk.compare("", baseline, current);
    let mut breaks = walk.breaks;
    breaks.sort_by(|a, b| {
        a.field
            .cmp(&b.field)
            .then((a.rule as u8).cmp(&(b.rule as u8)))
            .then_with(|| a.detail.cmp(&b.detail))
    });
    breaks.dedup();
    breaks
}

/// The schema that allows anything: what a missing sub-schema means.
static ANY: Value = Value::Bool(true);
/// The value `null`, allowed by a `{"type": "null"}` alternative.
static NULL: Value = Value::Null;

/// How deep a choice of values may nest in choices before it counts as a
/// choice of schemas; also bounds a chain of `$ref`s.
const MAX_DEPTH: u8 = 32;

/// Keywords that say nothing about which payloads are valid.
const ANNOTATIONS: &[&str] = &[
    "$comment",
    "$defs",
    "$id",
    "$schema",
    "default",
    "definitions",
    "deprecated",
    "description",
    "examples",
    "readOnly",
    "title",
    "writeOnly",
];

/// One comparison of two documents.
struct Walk<'a> {
    baseline: &'a Value,
    current: &'a Value,
    /// The pairs of (resolved) sub-schemas being compared on the way from
    /// the root to here: meeting one again means a recursive schema, whose
    /// rest was or will be compared higher up.
    on_path: Vec<(*const Value, *const Value)>,
    breaks: Vec<Break>,
}

impl<'a> Walk<'a> {
    fn report(&mut self, field: &str, rule: Rule, detail: String) {
        self.breaks.push(Break {
            field: field.to_owned(),
            rule,
            detail,
        });
    }

    /// Compares two sub-schemas found at `path`.
    fn compare(&mut self, path: &str, baseline: &'a Value, current: &'a Value) {
        let (baseline, current) = match (
            resolve(self.baseline, baseline),
            resolve(self.current, current),
        ) {
            (Resolved::Schema(b), Resolved::Schema(c)) => (b, c),
            (Resolved::Dangling(b), Resolved::Dangling(c)) if b == c => return,
            (Resolved::Dangling(b), Resolved::Dangling(c)) => {
                let detail = format!("reference {} became {}", quote(b), quote(c));
                return self.report(path, Rule::TypeChanged, detail);
            }
            (Resolved::Dangling(b), Resolved::Schema(_)) => {
                let detail = format!("reference {} does not resolve in the baseline", quote(b));
                return self.report(path, Rule::TypeChanged, detail);
            }
            (Resolved::Schema(_), Resolved::Dangling(c)) => {
                let detail = format!("reference {} does not resolve now", quote(c));
                return self.report(path, Rule::TypeChanged, detail);
            }
        };
        let pair = (baseline as *const Value, current as *const Value);
        if self.on_path.contains(&pair) {
            return;
        }
        self.on_path.push(pair);
        let old = read(self.baseline, baseline, MAX_DEPTH);
        let new = read(self.current, current, MAX_DEPTH);
        self.compare_nodes(path, &old, &new);
        self.on_path.pop();
    }

    fn compare_nodes(&mut self, path: &str, old: &Node<'a>, new: &Node<'a>) {
        match (&old.choice, &new.choice) {
            (None, None) => {}
            (Some((old_kind, old_alts)), Some((new_kind, new_alts)))
                if old_kind == new_kind && old_alts.len() == new_alts.len() =>
            {
                for (b, c) in old_alts.iter().zip(new_alts) {
                    self.compare(path, b, c);
                }
                return;
            }
            _ => {
                let detail = format!("{} became {}", shape(old), shape(new));
                return self.report(path, Rule::TypeChanged, detail);
            }
        }

        if old.types != new.types {
            let detail = format!(
                "type {} became {}",
                show_types(&old.types),
                show_types(&new.types)
            );
            self.report(path, Rule::TypeChanged, detail);
        } else {
            // A format qualifies its type: it is only news when the type
            // stayed.
            let detail = match (old.format, new.format) {
                (Some(b), Some(c)) if b != c => {
                    Some(format!("format {} became {}", quote(b), quote(c)))
                }
                (Some(b), None) => Some(format!("format {} dropped", quote(b))),
                (None, Some(c)) => Some(format!("format {} added", quote(c))),
                _ => None,
            };
            if let Some(detail) = detail {
                self.report(path, Rule::TypeChanged, detail);
            }
        }

        match (&old.values, &new.values) {
            (Some(old_values), Some(new_values)) => {
                for value in old_values {
                    if !new_values.contains(value) {
                        let detail = format!("value {value} no longer allowed");
                        self.report(path, Rule::EnumNarrowed, detail);
                    }
                }
            }
            (None, Some(new_values)) => {
                let listed: Vec<String> = new_values.iter().map(|v| v.to_string()).collect();
                let detail = format!("any value became one of {}", listed.join(", "));
                self.report(path, Rule::EnumNarrowed, detail);
            }
            // No list now: any value of the type, a widening.
            (_, None) => {}
        }

        if old.allows("object") && new.allows("object") {
            self.compare_properties(path, old, new);
            if let (Some(b), Some(c)) = (old.additional, new.additional) {
                self.compare(&format!("{path}{{}}"), b, c);
            }
        }

        if old.allows("array") && new.allows("array") {
            if old.items.is_some() || new.items.is_some() {
                let items = format!("{path}[]");
                self.compare(&items, old.items.unwrap_or(&ANY), new.items.unwrap_or(&ANY));
            }
            match (old.tuple, new.tuple) {
                (None, None) => {}
                (Some(b), Some(c)) if b.len() == c.len() => {
                    for (i, (b, c)) in b.iter().zip(c).enumerate() {
                        self.compare(&format!("{path}[{i}]"), b, c);
                    }
                }
                (b, c) => {
                    let detail = format!("{} became {}", tuple_shape(b), tuple_shape(c));
                    self.report(path, Rule::TypeChanged, detail);
                }
            }
        }
    }

    fn compare_properties(&mut self, path: &str, old: &Node<'a>, new: &Node<'a>) {
        let old_names = old.field_names();
        let new_names = new.field_names();
        for &name in &old_names {
            let field = join(path, name);
            if !new_names.contains(name) {
                self.report(
                    &field,
                    Rule::FieldRemoved,
                    "no longer in the schema".to_owned(),
                );
                continue;
            }
            match (old.required.contains(name), new.required.contains(name)) {
                (false, true) => self.report(
                    &field,
                    Rule::FieldMadeRequired,
                    "optional before, required now".to_owned(),
                ),
                (true, false) => self.report(
                    &field,
                    Rule::FieldMadeOptional,
                    "required before, optional now".to_owned(),
                ),
                _ => {}
            }
            let b = old.property(name);
            let c = new.property(name);
            if b.is_some() || c.is_some() {
                self.compare(&field, b.unwrap_or(&ANY), c.unwrap_or(&ANY));
            }
        }
        for &name in new_names.difference(&old_names) {
            if new.required.contains(name) {
                self.report(
                    &join(path, name),
                    Rule::FieldMadeRequired,
                    "new field, required".to_owned(),
                );
            }
        }
    }
}

/// A sub-schema after following its `$ref`s.
enum Resolved<'a> {
    Schema(&'a Value),
    /// A `$ref` that names nothing in its document (or only more `$ref`s,
    /// round in a loop).
    Dangling(&'a str),
}

/// Follows `$ref`s and one-element `allOf` wrappers (which `schemars` puts
/// around a `$ref` to give it a description) to the schema they stand for.
fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> Resolved<'a> {
    let mut last_ref = "";
    for _ in 0..MAX_DEPTH {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            last_ref = reference;
            match lookup(root, reference) {
                Some(target) => schema = target,
                None => return Resolved::Dangling(reference),
            }
        } else if let Some(inner) = lone_all_of(schema) {
            schema = inner;
        } else {
            return Resolved::Schema(schema);
        }
    }
    Resolved::Dangling(last_ref)
}

/// The sub-schema a `#`-rooted reference (`#/$defs/X`, `#/definitions/X`,
/// `#`) names in `root`.
fn lookup<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    match reference.strip_prefix('#')? {
        "" => Some(root),
        pointer => root.pointer(pointer),
    }
}

/// The one schema of an `allOf` that has nothing else but annotations.
fn lone_all_of(schema: &Value) -> Option<&Value> {
    let object = schema.as_object()?;
    match object.get("allOf")?.as_array()?.as_slice() {
        [inner]
            if object
                .keys()
                .all(|k| k == "allOf" || ANNOTATIONS.contains(&k.as_str())) =>
        {
            Some(inner)
        }
        _ => None,
    }
}

/// Whether alternatives must all hold (`allOf`) or one (`anyOf`, `oneOf`:
/// `schemars` writes either for the same thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combine {
    One,
    All,
}

/// What a (resolved) sub-schema allows, in the terms compared.
#[derive(Default)]
struct Node<'a> {
    /// The allowed types, declared or inferred; `None`: any type.
    types: Option<BTreeSet<&'a str>>,
    format: Option<&'a str>,
    /// The allowed values (`enum`, `const`, or a choice of those);
    /// `None`: any value of the types.
    values: Option<Vec<&'a Value>>,
    /// Alternatives that are schemas rather than values.
    choice: Option<(Combine, Vec<&'a Value>)>,
    properties: Option<&'a Map<String, Value>>,
    required: BTreeSet<&'a str>,
    /// The schema of an array's items (after a tuple's, if any).
    items: Option<&'a Value>,
    /// The schemas of a tuple's leading items (`prefixItems`, or `items`
    /// written as a list).
    tuple: Option<&'a [Value]>,
    /// The schema of a map's values.
    additional: Option<&'a Value>,
}

impl<'a> Node<'a> {
    fn allows(&self, kind: &str) -> bool {
        self.types.as_ref().is_some_and(|t| t.contains(kind))
    }

    /// The names of the properties, described or only required.
    fn field_names(&self) -> BTreeSet<&'a str> {
        let mut names = self.required.clone();
        if let Some(properties) = self.properties {
            names.extend(properties.keys().map(String::as_str));
        }
        names
    }

    fn property(&self, name: &str) -> Option<&'a Value> {
        self.properties?.get(name)
    }
}

/// Reads what `schema` (resolved, in document `root`) allows. `depth`
/// bounds how far nested choices of values are flattened.
fn read<'a>(root: &'a Value, schema: &'a Value, depth: u8) -> Node<'a> {
    let Some(object) = schema.as_object() else {
        // `true` allows anything, `false` nothing.
        return Node {
            types: (schema == &Value::Bool(false)).then(BTreeSet::new),
            ..Node::default()
        };
    };
    let mut node = Node {
        types: match object.get("type") {
            Some(Value::String(name)) => Some(BTreeSet::from([name.as_str()])),
            Some(Value::Array(names)) => Some(names.iter().filter_map(Value::as_str).collect()),
            _ => None,
        },
        format: object.get("format").and_then(Value::as_str),
        values: match (object.get("const"), object.get("enum")) {
            (Some(value), _) => Some(vec![value]),
            (None, Some(Value::Array(values))) => Some(values.iter().collect()),
            _ => None,
        },
        properties: object.get("properties").and_then(Value::as_object),
        required: object
            .get("required")
            .and_then(Value::as_array)
            .map(|names| names.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default(),
        additional: object
            .get("additionalProperties")
            .filter(|schema| schema.is_object()),
        ..Node::default()
    };
    match object.get("items") {
        Some(Value::Array(tuple)) => node.tuple = Some(tuple),
        Some(items) => node.items = Some(items),
        None => {}
    }
    if let Some(Value::Array(tuple)) = object.get("prefixItems") {
        node.tuple = Some(tuple);
    }

    let alternatives = [
        ("anyOf", Combine::One),
        ("oneOf", Combine::One),
        ("allOf", Combine::All),
    ]
    .into_iter()
    .find_map(|(keyword, combine)| Some((combine, object.get(keyword)?.as_array()?)));
    if let Some((combine, alternatives)) = alternatives {
        match value_choice(root, combine, alternatives, depth) {
            Some((types, values)) => {
                node.values = Some(values);
                if node.types.is_none() {
                    node.types = types;
                }
            }
            None => node.choice = Some((combine, alternatives.iter().collect())),
        }
    }

    if node.types.is_none() && node.choice.is_none() {
        node.types = infer_types(&node);
    }
    node
}

/// The types and the values a choice of values allows.
type Values<'a> = (Option<BTreeSet<&'a str>>, Vec<&'a Value>);

/// A choice whose alternatives are all values (`const`, `enum`, or the
/// `null` of `{"type": "null"}`), as `schemars` writes an enum whose
/// variants carry doc comments, or an `Option` of an enum: the union of
/// the alternatives' types and values. `None` when it is a choice of
/// schemas.
fn value_choice<'a>(
    root: &'a Value,
    combine: Combine,
    alternatives: &'a [Value],
    depth: u8,
) -> Option<Values<'a>> {
    if combine != Combine::One || depth == 0 {
        return None;
    }
    let mut types = Some(BTreeSet::new());
    let mut values = Vec::new();
    let mut listed = false;
    for alternative in alternatives {
        let Resolved::Schema(alternative) = resolve(root, alternative) else {
            return None;
        };
        let node = read(root, alternative, depth - 1);
        if node.choice.is_some() {
            return None;
        }
        match node.values {
            Some(alternative_values) => {
                listed = true;
                values.extend(alternative_values);
            }
            None if node.types == Some(BTreeSet::from(["null"])) => values.push(&NULL),
            None => return None,
        }
        match (&mut types, node.types) {
            (Some(all), Some(these)) => all.extend(these),
            _ => types = None,
        }
    }
    listed.then_some((types, values))
}

/// The types a schema without `type` stands for: those of its listed
/// values, else object or array from its keywords, else any.
fn infer_types<'a>(node: &Node<'a>) -> Option<BTreeSet<&'a str>> {
    if let Some(values) = &node.values {
        return Some(values.iter().map(|value| json_type(value)).collect());
    }
    if node.properties.is_some() || !node.required.is_empty() || node.additional.is_some() {
        return Some(BTreeSet::from(["object"]));
    }
    if node.items.is_some() || node.tuple.is_some() {
        return Some(BTreeSet::from(["array"]));
    }
    None
}

/// The JSON Schema type of a value.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `"string"`, `["null", "string"]`, `any` or `nothing`.
fn show_types(types: &Option<BTreeSet<&str>>) -> String {
    match types {
        None => "any".to_owned(),
        Some(types) if types.is_empty() => "nothing".to_owned(),
        Some(types) if types.len() == 1 => types.iter().map(|t| quote(t)).collect(),
        Some(types) => {
            let quoted: Vec<String> = types.iter().map(|t| quote(t)).collect();
            format!("[{}]", quoted.join(", "))
        }
    }
}

/// A node's shape, to say how a choice of alternatives changed.
fn shape(node: &Node<'_>) -> String {
    match &node.choice {
        Some((Combine::One, alternatives)) => {
            format!("a choice of {} alternatives", alternatives.len())
        }
        Some((Combine::All, alternatives)) => {
            format!("a combination of {} schemas", alternatives.len())
        }
        None => format!("type {}", show_types(&node.types)),
    }
}

fn tuple_shape(tuple: Option<&[Value]>) -> String {
    match tuple {
        Some(items) => format!("a tuple of {} items", items.len()),
        None => "a list".to_owned(),
    }
}

fn quote(text: &str) -> String {
    Value::from(text).to_string()
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Modelled on `OrderPlaced.v1.json`.
    fn order_placed() -> Value {
        json!({
            "$defs": {
                "PricedLine": {
                    "description": "A line with the unit price the order was placed at.",
                    "properties": {
                        "productId": { "type": "string" },
                        "quantity": { "format": "int64", "type": "integer" },
                        "unitPriceCents": { "format": "int64", "type": "integer" }
                    },
                    "required": ["productId", "quantity", "unitPriceCents"],
                    "type": "object"
                }
            },
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "properties": {
                "customerId": { "type": "string" },
                "lines": { "items": { "$ref": "#/$defs/PricedLine" }, "type": "array" },
                "orderId": { "type": "string" },
                "totalCents": { "format": "int64", "type": "integer" }
            },
            "required": ["orderId", "customerId", "lines", "totalCents"],
            "title": "OrderPlaced",
            "type": "object"
        })
    }

    /// An order's state with an enum and a nullable field.
    fn order_status() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "properties": {
                "orderId": { "type": "string" },
                "reason": { "type": ["string", "null"] },
                "status": {
                    "type": "string",
                    "enum": ["PENDING", "CONFIRMED", "REJECTED", "CANCELLED"]
                }
            },
            "required": ["orderId", "status"],
            "title": "OrderStatus",
            "type": "object"
        })
    }

    /// `schema` after `change`.
    fn edit(schema: &Value, change: impl FnOnce(&mut Value)) -> Value {
        let mut edited = schema.clone();
        change(&mut edited);
        edited
    }

    fn at<'v>(schema: &'v mut Value, pointer: &str) -> &'v mut Value {
        schema.pointer_mut(pointer).expect(pointer)
    }

    fn object<'v>(schema: &'v mut Value, pointer: &str) -> &'v mut Map<String, Value> {
        at(schema, pointer).as_object_mut().expect(pointer)
    }

    fn list<'v>(schema: &'v mut Value, pointer: &str) -> &'v mut Vec<Value> {
        at(schema, pointer).as_array_mut().expect(pointer)
    }

    fn unrequire(schema: &mut Value, pointer: &str, name: &str) {
        list(schema, pointer).retain(|n| n != name);
    }

    /// The (field, rule) of each break.
    fn found(breaks: &[Break]) -> Vec<(&str, Rule)> {
        breaks.iter().map(|b| (b.field.as_str(), b.rule)).collect()
    }

    #[test]
    fn removing_a_top_level_field_is_a_break() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            object(s, "/properties").remove("customerId");
            unrequire(s, "/required", "customerId");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("customerId", Rule::FieldRemoved)]);
    }

    #[test]
    fn removing_a_field_of_a_line_is_a_break() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            object(s, "/$defs/PricedLine/properties").remove("quantity");
            unrequire(s, "/$defs/PricedLine/required", "quantity");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("lines[].quantity", Rule::FieldRemoved)]);
    }

    #[test]
    fn renaming_a_field_is_a_removal_and_a_new_required_field() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            let properties = object(s, "/properties");
            let schema = properties.remove("customerId").unwrap();
            properties.insert("buyerId".to_owned(), schema);
            for name in list(s, "/required") {
                if name == "customerId" {
                    *name = json!("buyerId");
                }
            }
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(
            found(&breaks),
            [
                ("buyerId", Rule::FieldMadeRequired),
                ("customerId", Rule::FieldRemoved)
            ]
        );
    }

    #[test]
    fn integer_to_string_is_a_type_change() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            *at(s, "/$defs/PricedLine/properties/unitPriceCents") = json!({ "type": "string" });
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(
            found(&breaks),
            [("lines[].unitPriceCents", Rule::TypeChanged)]
        );
        assert_eq!(
            breaks[0].to_string(),
            r#"lines[].unitPriceCents: type changed (type "integer" became "string")"#
        );
    }

    #[test]
    fn int64_to_int32_is_a_type_change() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            *at(s, "/properties/totalCents/format") = json!("int32");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("totalCents", Rule::TypeChanged)]);
        assert_eq!(breaks[0].detail, r#"format "int64" became "int32""#);
    }

    #[test]
    fn a_nullable_field_made_non_null_is_a_type_change() {
        let baseline = order_status();
        let current = edit(&baseline, |s| {
            *at(s, "/properties/reason/type") = json!("string");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("reason", Rule::TypeChanged)]);
        assert_eq!(
            breaks[0].detail,
            r#"type ["null", "string"] became "string""#
        );
    }

    #[test]
    fn an_optional_field_made_required_is_a_break() {
        let baseline = order_status();
        let current = edit(&baseline, |s| list(s, "/required").push(json!("reason")));
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("reason", Rule::FieldMadeRequired)]);
    }

    #[test]
    fn a_new_required_field_is_a_break() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            object(s, "/properties").insert("currency".to_owned(), json!({ "type": "string" }));
            list(s, "/required").push(json!("currency"));
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("currency", Rule::FieldMadeRequired)]);
        assert_eq!(breaks[0].detail, "new field, required");
    }

    #[test]
    fn a_required_field_made_optional_is_a_break() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| unrequire(s, "/required", "totalCents"));
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("totalCents", Rule::FieldMadeOptional)]);
    }

    #[test]
    fn narrowing_an_enum_is_a_break_per_value() {
        let baseline = order_status();
        let current = edit(&baseline, |s| {
            list(s, "/properties/status/enum").retain(|v| v != "CANCELLED");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("status", Rule::EnumNarrowed)]);
        assert_eq!(breaks[0].detail, r#"value "CANCELLED" no longer allowed"#);

        let current = edit(&baseline, |s| {
            *at(s, "/properties/status/enum") = json!(["PENDING", "CONFIRMED"]);
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(
            found(&breaks),
            [
                ("status", Rule::EnumNarrowed),
                ("status", Rule::EnumNarrowed)
            ]
        );
    }

    #[test]
    fn narrowing_an_enum_of_consts_is_a_break() {
        let status = |values: &[&str]| {
            let alternatives: Vec<Value> = values
                .iter()
                .map(|v| json!({ "type": "string", "const": v, "description": "A state." }))
                .collect();
            json!({
                "properties": { "status": { "oneOf": alternatives } },
                "required": ["status"],
                "type": "object"
            })
        };
        let baseline = status(&["PENDING", "CONFIRMED", "REJECTED"]);
        let current = status(&["PENDING", "CONFIRMED"]);
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("status", Rule::EnumNarrowed)]);
        assert_eq!(breaks[0].detail, r#"value "REJECTED" no longer allowed"#);
    }

    #[test]
    fn limiting_a_free_string_to_an_enum_is_a_break() {
        let baseline = edit(&order_status(), |s| {
            object(s, "/properties/status").remove("enum");
        });
        let breaks = breaking_changes(&baseline, &order_status());
        assert_eq!(found(&breaks), [("status", Rule::EnumNarrowed)]);
    }

    #[test]
    fn an_option_of_a_struct_compares_its_alternatives() {
        let baseline = json!({
            "$defs": {
                "Address": {
                    "properties": { "city": { "type": "string" }, "street": { "type": "string" } },
                    "required": ["city", "street"],
                    "type": "object"
                }
            },
            "properties": {
                "shipping": { "anyOf": [{ "$ref": "#/$defs/Address" }, { "type": "null" }] }
            },
            "type": "object"
        });
        let current = edit(&baseline, |s| {
            object(s, "/$defs/Address/properties").remove("city");
            unrequire(s, "/$defs/Address/required", "city");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("shipping.city", Rule::FieldRemoved)]);

        let current = edit(&baseline, |s| {
            *at(s, "/properties/shipping") = json!({ "$ref": "#/$defs/Address" });
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("shipping", Rule::TypeChanged)]);
        assert_eq!(
            breaks[0].detail,
            r#"a choice of 2 alternatives became type "object""#
        );
    }

    #[test]
    fn recursive_schemas_are_compared_once_round() {
        let baseline = json!({
            "$defs": {
                "Category": {
                    "properties": {
                        "name": { "type": "string" },
                        "children": { "items": { "$ref": "#/$defs/Category" }, "type": "array" }
                    },
                    "required": ["name", "children"],
                    "type": "object"
                }
            },
            "properties": { "root": { "$ref": "#/$defs/Category" } },
            "required": ["root"],
            "type": "object"
        });
        assert_eq!(breaking_changes(&baseline, &baseline), []);

        // The same tree under another name, with its `name` made a number.
        let current = json!({
            "$defs": {
                "Node": {
                    "properties": {
                        "name": { "type": "integer" },
                        "children": { "items": { "$ref": "#/$defs/Node" }, "type": "array" }
                    },
                    "required": ["name", "children"],
                    "type": "object"
                }
            },
            "properties": { "root": { "$ref": "#/$defs/Node" } },
            "required": ["root"],
            "type": "object"
        });
        // `children[]` is the pair (Category, Node) again: its change is
        // the one already reported, not one more.
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(found(&breaks), [("root.name", Rule::TypeChanged)]);

        let root_recursive = json!({
            "properties": { "children": { "items": { "$ref": "#" }, "type": "array" } },
            "type": "object"
        });
        assert_eq!(breaking_changes(&root_recursive, &root_recursive), []);
    }

    #[test]
    fn compatible_changes_have_no_break() {
        let placed = order_placed();
        let status = order_status();
        let cases = [
            (
                "optional field added",
                &placed,
                edit(&placed, |s| {
                    object(s, "/properties")
                        .insert("note".to_owned(), json!({ "type": ["string", "null"] }));
                }),
            ),
            (
                "descriptions, titles, examples and defaults changed",
                &placed,
                edit(&placed, |s| {
                    *at(s, "/$defs/PricedLine/description") = json!("Another description.");
                    *at(s, "/title") = json!("OrderPlacedEvent");
                    let total = object(s, "/properties/totalCents");
                    total.insert("description".to_owned(), json!("In cents."));
                    total.insert("examples".to_owned(), json!([1250]));
                    total.insert("default".to_owned(), json!(0));
                }),
            ),
            (
                "enum widened",
                &status,
                edit(&status, |s| {
                    list(s, "/properties/status/enum").push(json!("SHIPPED"));
                }),
            ),
            (
                "properties and required reordered",
                &placed,
                edit(&placed, |s| {
                    let properties = object(s, "/properties");
                    let mut entries: Vec<(String, Value)> =
                        std::mem::take(properties).into_iter().collect();
                    entries.reverse();
                    properties.extend(entries);
                    list(s, "/required").reverse();
                }),
            ),
            (
                "$defs entry inlined",
                &placed,
                edit(&placed, |s| {
                    let line = object(s, "").remove("$defs").unwrap()["PricedLine"].clone();
                    *at(s, "/properties/lines/items") = line;
                }),
            ),
            (
                "$defs entry renamed",
                &placed,
                edit(&placed, |s| {
                    let defs = object(s, "/$defs");
                    let line = defs.remove("PricedLine").unwrap();
                    defs.insert("OrderLine".to_owned(), line);
                    *at(s, "/properties/lines/items/$ref") = json!("#/$defs/OrderLine");
                }),
            ),
            (
                "$defs moved to definitions",
                &placed,
                edit(&placed, |s| {
                    let defs = object(s, "").remove("$defs").unwrap();
                    object(s, "").insert("definitions".to_owned(), defs);
                    *at(s, "/properties/lines/items/$ref") = json!("#/definitions/PricedLine");
                }),
            ),
            (
                "enum written as a choice of consts",
                &status,
                edit(&status, |s| {
                    *at(s, "/properties/status") = json!({ "oneOf": [
                        { "type": "string", "const": "PENDING" },
                        { "type": "string", "enum": ["CONFIRMED", "REJECTED"] },
                        { "type": "string", "const": "CANCELLED", "description": "By the customer." }
                    ]});
                }),
            ),
            (
                "field schema moved to $defs behind a described $ref",
                &placed,
                edit(&placed, |s| {
                    let defs = object(s, "/$defs");
                    defs.insert(
                        "Cents".to_owned(),
                        json!({ "format": "int64", "type": "integer" }),
                    );
                    *at(s, "/properties/totalCents") = json!({
                        "allOf": [{ "$ref": "#/$defs/Cents" }],
                        "description": "The order's total."
                    });
                }),
            ),
        ];
        for (name, baseline, current) in &cases {
            assert_eq!(breaking_changes(baseline, current), [], "{name}");
        }
    }

    #[test]
    fn every_contract_is_compatible_with_itself() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tandem-contracts/schemas");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect(dir) {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let schema: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(breaking_changes(&schema, &schema), [], "{}", path.display());
            checked += 1;
        }
        assert!(checked > 0, "no schema in {dir}");
    }

    #[test]
    fn breaks_come_in_field_then_rule_order() {
        let baseline = order_placed();
        let current = edit(&baseline, |s| {
            *at(s, "/properties/totalCents") = json!({ "type": "string" });
            unrequire(s, "/required", "totalCents");
            object(s, "/properties").remove("orderId");
            unrequire(s, "/required", "orderId");
            *at(s, "/$defs/PricedLine/properties/productId/type") = json!("integer");
        });
        let breaks = breaking_changes(&baseline, &current);
        assert_eq!(
            found(&breaks),
            [
                ("lines[].productId", Rule::TypeChanged),
                ("orderId", Rule::FieldRemoved),
                ("totalCents", Rule::TypeChanged),
                ("totalCents", Rule::FieldMadeOptional),
            ]
        );
    }

    #[test]
    fn rules_and_breaks_read_plainly() {
        assert_eq!(Rule::FieldRemoved.to_string(), "field removed");
        assert_eq!(Rule::TypeChanged.as_str(), "type changed");
        assert_eq!(Rule::FieldMadeRequired.as_str(), "field made required");
        assert_eq!(Rule::FieldMadeOptional.as_str(), "field made optional");
        assert_eq!(Rule::EnumNarrowed.as_str(), "enum narrowed");
        let root = Break {
            field: String::new(),
            rule: Rule::TypeChanged,
            detail: r#"type "object" became "array""#.to_owned(),
        };
        assert_eq!(
            root.to_string(),
            r#"(root): type changed (type "object" became "array")"#
        );
    }
}
