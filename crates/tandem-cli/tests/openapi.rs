//! Each service's `/openapi.json`, as a running service serves it, read
//! by an outside OpenAPI 3.1 parser (the `oas3` crate) and held to what
//! the code does: every `{name}` in a path is a declared path parameter,
//! query parameters are in the query, every error answer is a problem
//! document (`application/problem+json`), and an operation with a JSON
//! body documents what the shared plumbing answers for a bad one (400,
//! 408, 413, 415).

mod common;

use common::{start, url};
use serde_json::Value;
use tandem_cli::serve::Service;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_describes_its_parameters_and_errors_as_the_code_answers() {
    let dir = tempfile::tempdir().unwrap();
    let system = start(dir.path()).await;
    let http = system.http().clone();
    for service in Service::ALL {
        let base = url(&system, service);
        let text = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("GET /openapi.json")
            .text()
            .await
            .expect("a body");
        let parsed = oas3::from_json(&text)
            .unwrap_or_else(|error| panic!("{service:?}: not OpenAPI 3.1 ({error}): {text}"));
        assert!(
            parsed.openapi.starts_with("3.1"),
            "{service:?}: {}",
            parsed.openapi
        );
        let document: Value = serde_json::from_str(&text).unwrap();
        let paths = document["paths"].as_object().expect("paths");
        assert!(!paths.is_empty(), "{service:?} describes no path");
        for (path, item) in paths {
            let templated: Vec<&str> = path
                .split('/')
                .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for method in METHODS {
                let Some(operation) = item.get(method) else {
                    continue;
                };
                let what = format!("{service:?} {} {path}", method.to_uppercase());
                let parameters = operation["parameters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for name in &templated {
                    assert!(
                        parameters.iter().any(|parameter| parameter["name"] == *name
                            && parameter["in"] == "path"
                            && parameter["required"] == true),
                        "{what}: no required path parameter {name}: {parameters:?}"
                    );
                }
                for parameter in &parameters {
                    if parameter["in"] == "path" {
                        assert!(
                            templated.contains(&parameter["name"].as_str().unwrap_or_default()),
                            "{what}: path parameter {} is not in the path",
                            parameter["name"]
                        );
                    }
                }
                let responses = operation["responses"].as_object().expect("responses");
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let content = response["content"].as_object().expect("content");
                        assert_eq!(
                            content.keys().collect::<Vec<_>>(),
                            vec!["application/problem+json"],
                            "{what} {status}"
                        );
                    }
                }
                assert!(responses.contains_key("503"), "{what}: no 503");
                if operation.get("requestBody").is_some() {
                    for status in ["400", "408", "413", "415"] {
                        assert!(responses.contains_key(status), "{what}: no {status}");
                    }
                }
            }
        }
    }
    // The listing's page size is a query parameter, not a path one.
    let customers = http
        .get(format!("{}/openapi.json", url(&system, Service::Customer)))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let limit = customers["paths"]["/customers"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|parameter| parameter["name"] == "limit")
        .cloned()
        .expect("a limit parameter");
    assert_eq!(limit["in"], "query", "{limit}");
}
