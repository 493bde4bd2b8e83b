//! An upstream CRD's validation rules (`x-kubernetes-validations`, CEL), checked on an update the
//! way a current API server checks them. The 1.20 test server ignores these rules, so the tests
//! hold the controller's writes to other projects' resources to them here.
//!
//! What the API server does, and this does too: defaults from the schema are applied to both
//! sides first; a rule runs only where its node is present; a rule that reads `oldSelf` (a
//! transition rule) runs only where the old object has the node too, with list items correlated by
//! their `x-kubernetes-list-map-keys`. A rule that does not evaluate to `true`, or cannot be
//! evaluated, is a violation.

use serde_json::{Map, Value};

/// One rule an update breaks.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: String,
    pub rule: String,
    pub message: String,
    /// `false`, or why the rule could not be evaluated.
    pub outcome: String,
}

pub struct CrdRules {
    schema: Value,
}

impl CrdRules {
    /// The rules of `version` in a CustomResourceDefinition.
    pub fn of(crd: &Value, version: &str) -> Self {
        let schema = crd["spec"]["versions"]
            .as_array()
            .and_then(|versions| versions.iter().find(|v| v["name"] == version))
            .map(|v| v["schema"]["openAPIV3Schema"].clone())
            .unwrap_or_else(|| panic!("the CRD has no version {version}"));
        Self { schema }
    }

    /// Every rule in the schema, as (path, rule).
    pub fn rules(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        collect(&self.schema, "", &mut out);
        out
    }

    /// The violations of an update from `old` to `new`.
    pub fn check_update(&self, old: &Value, new: &Value) -> Vec<Violation> {
        let old = defaulted(&self.schema, old);
        let new = defaulted(&self.schema, new);
        let mut out = Vec::new();
        walk(&self.schema, Some(&old), &new, "", &mut out);
        out
    }

    /// The violations of creating `new`.
    pub fn check_create(&self, new: &Value) -> Vec<Violation> {
        let new = defaulted(&self.schema, new);
        let mut out = Vec::new();
        walk(&self.schema, None, &new, "", &mut out);
        out
    }
}

fn collect(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push((
            path.to_string(),
            rule["rule"].as_str().unwrap_or("").to_string(),
        ));
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (key, child) in properties {
            collect(child, &format!("{path}.{key}"), out);
        }
    }
    if schema["items"].is_object() {
        collect(&schema["items"], &format!("{path}[]"), out);
    }
    if schema["additionalProperties"].is_object() {
        collect(&schema["additionalProperties"], &format!("{path}{{}}"), out);
    }
}

/// `value` with the schema's defaults filled in where a property is absent.
fn defaulted(schema: &Value, value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, child) in map {
                let child_schema = schema["properties"]
                    .get(key)
                    .or_else(|| schema.get("additionalProperties").filter(|s| s.is_object()));
                out.insert(
                    key.clone(),
                    match child_schema {
                        Some(s) => defaulted(s, child),
                        None => child.clone(),
                    },
                );
            }
            if let Some(properties) = schema["properties"].as_object() {
                for (key, child) in properties {
                    if let (false, Some(default)) = (out.contains_key(key), child.get("default")) {
                        out.insert(key.clone(), defaulted(child, default));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| defaulted(&schema["items"], item))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn walk(schema: &Value, old: Option<&Value>, new: &Value, path: &str, out: &mut Vec<Violation>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or("");
        let transition = text.contains("oldSelf");
        if transition && old.is_none() {
            continue;
        }
        let outcome = evaluate(text, new, old);
        if outcome != "true" {
            out.push(Violation {
                path: if path.is_empty() {
                    ".".into()
                } else {
                    path.into()
                },
                rule: text.into(),
                message: rule["message"].as_str().unwrap_or("").into(),
                outcome,
            });
        }
    }
    match new {
        Value::Object(map) => {
            for (key, child) in map {
                let child_schema = schema["properties"]
                    .get(key)
                    .or_else(|| schema.get("additionalProperties").filter(|s| s.is_object()));
                if let Some(child_schema) = child_schema {
                    let old_child = old.and_then(|o| o.get(key));
                    walk(
                        child_schema,
                        old_child,
                        child,
                        &format!("{path}.{key}"),
                        out,
                    );
                }
            }
        }
        Value::Array(items) => {
            let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let is_map = schema["x-kubernetes-list-type"] == "map" && !keys.is_empty();
            for (i, item) in items.iter().enumerate() {
                // Only list-map items are correlated with the old list; other items are new.
                let old_item = old
                    .and_then(Value::as_array)
                    .filter(|_| is_map)
                    .and_then(|olds| {
                        olds.iter()
                            .find(|o| keys.iter().all(|k| o.get(*k) == item.get(*k)))
                    });
                walk(
                    &schema["items"],
                    old_item,
                    item,
                    &format!("{path}[{i}]"),
                    out,
                );
            }
        }
        _ => {}
    }
}

/// `"true"`, or what the rule gave instead.
fn evaluate(rule: &str, new: &Value, old: Option<&Value>) -> String {
    let program = match cel::Program::compile(rule) {
        Ok(program) => program,
        Err(e) => return format!("does not compile: {e}"),
    };
    let mut context = cel::Context::default();
    let bind = |context: &mut cel::Context, name: &str, value: &Value| {
        cel::to_value(value)
            .map_err(|e| e.to_string())
            .and_then(|v| context.add_variable(name, v).map_err(|e| e.to_string()))
    };
    if let Err(e) = bind(&mut context, "self", new) {
        return format!("cannot bind self: {e}");
    }
    if let Some(old) = old
        && let Err(e) = bind(&mut context, "oldSelf", old)
    {
        return format!("cannot bind oldSelf: {e}");
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(true)) => "true".into(),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// RFC 7386: `patch` merged into `target`, as the API server applies a JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    match patch {
        Value::Object(fields) => {
            let mut out = target.as_object().cloned().unwrap_or_default();
            for (key, value) in fields {
                if value.is_null() {
                    out.remove(key);
                } else {
                    let merged = merge_patch(out.get(key).unwrap_or(&Value::Null), value);
                    out.insert(key.clone(), merged);
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Every violation of `rules` in the sequence of an object's versions, pair by pair.
pub fn check_history(rules: &CrdRules, versions: &[Value]) -> Vec<(usize, Violation)> {
    versions
        .windows(2)
        .enumerate()
        .flat_map(|(i, pair)| {
            rules
                .check_update(&pair[0], &pair[1])
                .into_iter()
                .map(move |v| (i + 1, v))
        })
        .collect()
}
