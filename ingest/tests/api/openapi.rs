//! Keeps docs/openapi.yaml true: every answer the tests get from the live server must be
//! documented (path, method, status, content type, required headers) and its body must match
//! the documented schema. Undocumented paths and methods must be 404 / 405 problems.

use std::sync::LazyLock;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Reply;

pub static SPEC: LazyLock<Value> = LazyLock::new(|| {
    serde_norway::from_str(include_str!("../../../docs/openapi.yaml"))
        .expect("docs/openapi.yaml is YAML")
});

/// Follows a local `$ref` (`#/components/...`), if any.
pub fn deref(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
            deref(
                SPEC.pointer(pointer)
                    .unwrap_or_else(|| panic!("$ref {reference} resolves to nothing")),
            )
        }
        None => value,
    }
}

/// A validator for one schema of the document (OpenAPI 3.0 schemas are JSON Schema draft 4
/// plus annotations), with the document's components reachable by `$ref`.
pub fn validator(schema: &Value) -> jsonschema::Validator {
    let wrapped = json!({"allOf": [schema], "components": SPEC["components"]});
    jsonschema::draft4::options()
        .should_validate_formats(true)
        .with_format("uuid", |s: &str| uuid::Uuid::parse_str(s).is_ok())
        .build(&wrapped)
        .unwrap_or_else(|e| panic!("schema does not compile ({e}): {schema}"))
}

/// The documented path template `path` falls under, and its path item.
fn path_item(path: &str) -> Option<(&'static str, &'static Value)> {
    let path = path.split('?').next().unwrap_or(path);
    SPEC["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .find(|(template, _)| {
            let t: Vec<&str> = template.split('/').collect();
            let p: Vec<&str> = path.split('/').collect();
            t.len() == p.len()
                && t.iter().zip(&p).all(|(t, p)| {
                    (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p
                })
        })
        .map(|(template, item)| (template.as_str(), item))
}

#[track_caller]
fn assert_problem(what: &str, reply: &Reply) {
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    let problem = json!({"$ref": "#/components/schemas/Problem"});
    if let Err(e) = validator(&problem).validate(&reply.json()) {
        panic!("{what}: not a documented problem ({e}): {}", reply.text);
    }
}

/// Checks one live answer against the document.
#[track_caller]
pub fn check(method: &Method, path: &str, reply: &Reply) {
    let what = format!("{method} {path} → {}", reply.status);
    let Some((template, item)) = path_item(path) else {
        assert_eq!(
            reply.status, 404,
            "{what}: an undocumented path must be a 404"
        );
        return assert_problem(&what, reply);
    };
    let Some(operation) = item.get(method.as_str().to_lowercase()) else {
        assert_eq!(
            reply.status, 405,
            "{what}: an undocumented method must be a 405"
        );
        assert!(reply.header("allow").is_some(), "{what}: 405 without Allow");
        return assert_problem(&what, reply);
    };
    let response = deref(
        operation["responses"]
            .get(reply.status.to_string())
            .unwrap_or_else(|| panic!("{what}: status not documented for {method} {template}")),
    );
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, header) in headers {
            let value = reply.header(name);
            if header["required"] == true {
                assert!(value.is_some(), "{what}: documented header {name} missing");
            }
            if let Some(value) = value {
                let value = match deref(header)["schema"]["type"].as_str() {
                    Some("integer") => json!(value.parse::<i64>().unwrap_or_else(|_| {
                        panic!("{what}: header {name} is not an integer: {value}")
                    })),
                    _ => json!(value),
                };
                let schema = &deref(header)["schema"];
                assert!(
                    validator(schema).is_valid(&value),
                    "{what}: header {name}={value} breaks {schema}"
                );
            }
        }
    }
    let content_type = reply
        .header("content-type")
        .unwrap_or_else(|| panic!("{what}: no content type"));
    let essence = content_type.split(';').next().unwrap().trim();
    let media = response["content"].get(essence).unwrap_or_else(|| {
        panic!("{what}: content type {content_type} not documented for this status")
    });
    if essence.ends_with("json")
        && let Err(e) = validator(&media["schema"]).validate(&reply.json())
    {
        panic!(
            "{what}: body breaks the documented schema ({e}): {}",
            reply.text
        );
    }
}

/// Every `$ref` anywhere in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r);
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn the_document_is_well_formed_and_lists_every_route() {
    assert_eq!(SPEC["openapi"], "3.0.3");
    assert!(SPEC["info"]["title"].is_string() && SPEC["info"]["version"].is_string());

    let mut all = Vec::new();
    refs(&SPEC, &mut all);
    assert!(!all.is_empty());
    for r in all {
        deref(&json!({"$ref": r}));
    }

    let mut served: Vec<(String, String)> = Vec::new();
    let mut operation_ids = std::collections::HashSet::new();
    for (path, item) in SPEC["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            served.push((method.clone(), path.clone()));
            let id = operation["operationId"].as_str().expect("operationId");
            assert!(operation_ids.insert(id), "operationId {id} twice");
            let responses = operation["responses"].as_object().expect("responses");
            assert!(!responses.is_empty());
            for (status, response) in responses {
                assert!(status.parse::<u16>().is_ok(), "{method} {path} {status}");
                let response = deref(response);
                assert!(
                    response["description"].is_string(),
                    "{method} {path} {status}"
                );
                for media in response["content"].as_object().unwrap().values() {
                    validator(&media["schema"]);
                }
            }
        }
    }
    served.sort();
    let expected = [
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/readyz"),
        ("get", "/v1/api-key"),
        ("get", "/v1/charge-requests/{request_id}"),
        ("get", "/v1/substations"),
        ("post", "/v1/charge-requests"),
    ];
    assert_eq!(
        served,
        expected.map(|(m, p)| (m.to_owned(), p.to_owned())).to_vec()
    );
    for schema in SPEC["components"]["schemas"].as_object().unwrap().values() {
        validator(schema);
    }
}

#[test]
fn the_request_schema_says_what_the_validation_says() {
    let schema = validator(&json!({"$ref": "#/components/schemas/ChargeRequest"}));
    let now = chrono::Utc::now();
    // The schema cannot say the longest stay (a departure at most 156 h ahead, or the energy
    // deliverable within it): the bodies here keep within it, and fuzz.rs's hooks skip the rest.
    let in_a_day = (now + chrono::Duration::days(1)).to_rfc3339();
    for body in [
        json!({"vehicle_id": "ev-1", "energy_kwh": 200, "max_power_kw": 400}),
        json!({"vehicle_id": "é".repeat(64), "energy_kwh": 0.1, "max_power_kw": 1,
               "departure": in_a_day,
               "request_id": "6f1c0b5e-7a2d-4d55-9a3e-1f0e2b3c4d5e"}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 0.99}),
        json!({"vehicle_id": "", "energy_kwh": 30, "max_power_kw": 11}),
        json!({"vehicle_id": "x".repeat(65), "energy_kwh": 30, "max_power_kw": 11}),
        json!({"vehicle_id": "a\u{7}b", "energy_kwh": 30, "max_power_kw": 11}),
        json!({"vehicle_id": "ev", "energy_kwh": 0, "max_power_kw": 11}),
        json!({"vehicle_id": "ev", "energy_kwh": 200.5, "max_power_kw": 11}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 400.01}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": "11"}),
        json!({"vehicle_id": "ev", "energy_kwh": 30}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 11, "colour": "red"}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 11, "request_id": "x"}),
        json!({"vehicle_id": "ev", "energy_kwh": 30, "max_power_kw": 11, "departure": "soon"}),
    ] {
        let rules = evgrid_model::validate::parse_charge_request(body.to_string().as_bytes(), now);
        assert_eq!(
            schema.is_valid(&body),
            rules.is_ok(),
            "schema and validation disagree on {body}: {rules:?}"
        );
    }
}
