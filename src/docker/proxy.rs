//! The socket regobox gives the application: an HTTP/1.1 server on a Unix socket that applies
//! [`super::policy`] to every request and forwards what it allows to the engine.
//!
//! Request and response bodies stream through untouched (logs with follow, events, wait, build
//! contexts, pulls), and HTTP upgrades (attach) are spliced, except where the policy must read a
//! body: a container or network create (read up to `docker.max_inspected_body`, checked,
//! rewritten) and the image list (filtered). Ownership is the instance label: a container,
//! network or image of someone else answers 404 as if it did not exist, and lists leave it out.
//! Images carry no label when pulled or imported, so the ids of those the application pulled or
//! imported through this socket are kept in `secrets/docker-images.json` on the volume.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, TRANSFER_ENCODING, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::engine::Connector;
use super::policy::{self, CreatePolicy, Denied, Endpoint, INSTANCE_LABEL};
use crate::logs::SharedLogFile;

type Body = BoxBody<Bytes, hyper::Error>;

/// Why a request is not forwarded.
#[derive(Debug)]
enum Refusal {
    Denied(Denied),
    NotFound(String),
    BadRequest(String),
    TooLarge(String),
    Engine(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Engine(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn rule(&self) -> &str {
        match self {
            Refusal::Denied(d) => &d.rule,
            Refusal::NotFound(_) => "ownership",
            Refusal::BadRequest(_) => "request",
            Refusal::TooLarge(_) => "docker.max_inspected_body",
            Refusal::Engine(_) => "engine",
        }
    }

    fn message(&self) -> &str {
        match self {
            Refusal::Denied(d) => &d.message,
            Refusal::NotFound(m)
            | Refusal::BadRequest(m)
            | Refusal::TooLarge(m)
            | Refusal::Engine(m) => m,
        }
    }
}

impl From<Denied> for Refusal {
    fn from(d: Denied) -> Self {
        Refusal::Denied(d)
    }
}

/// Image ids the application pulled or imported through the proxy (its built images carry the
/// label), kept in a JSON file.
pub struct OwnedImages {
    path: PathBuf,
    ids: Mutex<BTreeSet<String>>,
}

impl OwnedImages {
    pub fn load(path: PathBuf) -> anyhow::Result<OwnedImages> {
        let ids = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a JSON list of image ids ({e}); move it away to start afresh",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(OwnedImages {
            path,
            ids: Mutex::new(ids),
        })
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.lock().map(|s| s.contains(id)).unwrap_or(false)
    }

    fn update(&self, f: impl FnOnce(&mut BTreeSet<String>) -> bool) {
        let Ok(mut ids) = self.ids.lock() else { return };
        if !f(&mut ids) {
            return;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&*ids).unwrap_or_default();
        let written = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the application's images");
        }
    }
}

/// Everything a request needs.
pub struct Proxy {
    pub connector: Connector,
    pub docker: bollard::Docker,
    pub instance: String,
    pub policy: CreatePolicy,
    pub images: Arc<OwnedImages>,
    pub audit: Option<SharedLogFile>,
    pub max_body: usize,
}

/// Serve `listener` until `shutdown` (open streams, such as a followed log, go on until the
/// process ends).
pub async fn serve(listener: UnixListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Docker proxy: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// What one request did, for the audit line.
struct Done {
    response: Response<Body>,
    object: Option<String>,
}

impl Proxy {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let mutating = method != Method::GET && method != Method::HEAD;
        let routed = policy::endpoint(method.as_str(), &path);
        let endpoint = routed.as_ref().ok().map(|(e, _)| *e);
        let result = match routed {
            Ok((ep, captures)) => self.dispatch(ep, captures, req).await,
            Err(d) => Err(Refusal::Denied(d)),
        };
        match result {
            Ok(done) => {
                if mutating {
                    self.audit(
                        &method,
                        &path,
                        endpoint,
                        "allow",
                        None,
                        done.object.as_deref(),
                        done.response.status(),
                        started,
                    );
                }
                done.response
            }
            Err(refusal) => {
                let status = refusal.status();
                // Reading a missing object is ordinary; refusals and mutations are audited.
                if mutating || matches!(refusal, Refusal::Denied(_)) {
                    self.audit(
                        &method,
                        &path,
                        endpoint,
                        "deny",
                        Some(refusal.rule()),
                        None,
                        status,
                        started,
                    );
                }
                json_response(status, &json!({ "message": refusal.message() }))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        method: &Method,
        path: &str,
        endpoint: Option<Endpoint>,
        decision: &str,
        rule: Option<&str>,
        object: Option<&str>,
        status: StatusCode,
        started: Instant,
    ) {
        let line = json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "method": method.as_str(),
            "path": path,
            "endpoint": endpoint.map(|e| format!("{e:?}")),
            "decision": decision,
            "rule": rule,
            "object": object,
            "status": status.as_u16(),
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        });
        tracing::info!(target: "regobox::docker::audit", method = %method, path, decision, rule, object, status = status.as_u16(), "docker audit");
        if let Some(file) = &self.audit {
            if let Ok(mut f) = file.lock() {
                f.write_line(&line.to_string());
            }
        }
    }

    async fn dispatch(
        &self,
        ep: Endpoint,
        captures: Vec<String>,
        mut req: Request<Incoming>,
    ) -> Result<Done, Refusal> {
        let query = req.uri().query().unwrap_or("").to_string();
        let plain = |response| Done {
            response,
            object: None,
        };
        match ep {
            Endpoint::Ping | Endpoint::Version | Endpoint::Info => {
                Ok(plain(self.forward(req.map(BodyExt::boxed), None).await?))
            }
            Endpoint::Events | Endpoint::ContainerList | Endpoint::NetworkList => {
                let q = with_label_filter(&query, &self.instance)?;
                set_query(&mut req, &q);
                Ok(plain(self.forward(req.map(BodyExt::boxed), None).await?))
            }
            Endpoint::Build => {
                let q = build_query(&query, &self.instance)?;
                set_query(&mut req, &q);
                Ok(plain(self.forward(req.map(BodyExt::boxed), None).await?))
            }
            Endpoint::ImageCreate => {
                let pairs = parse_query(&query);
                let get = |k: &str| {
                    pairs
                        .iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let reference = if !get("fromImage").is_empty() {
                    image_ref(&get("fromImage"), &get("tag"))
                } else if !get("repo").is_empty() {
                    image_ref(&get("repo"), &get("tag"))
                } else {
                    String::new()
                };
                let response = self.forward(req.map(BodyExt::boxed), None).await?;
                if !response.status().is_success() {
                    return Ok(plain(response));
                }
                // Record the image once the pull or import stream has ended.
                let docker = self.docker.clone();
                let images = self.images.clone();
                let object = (!reference.is_empty()).then(|| reference.clone());
                let response = response.map(move |body| {
                    OnEnd::new(body, move |tail: &[u8]| {
                        let reference = if reference.is_empty() {
                            imported_id(tail).unwrap_or_default()
                        } else {
                            reference
                        };
                        Box::pin(async move {
                            if reference.is_empty() {
                                return;
                            }
                            if let Ok(img) = docker.inspect_image(&reference).await {
                                if let Some(id) = img.id {
                                    images.update(|s| s.insert(id));
                                }
                            }
                        }) as Pin<Box<dyn Future<Output = ()> + Send>>
                    })
                    .boxed()
                });
                Ok(Done { response, object })
            }
            Endpoint::ImageList => {
                let response = self.forward(req.map(BodyExt::boxed), None).await?;
                if !response.status().is_success() {
                    return Ok(plain(response));
                }
                let (parts, body) = response.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| Refusal::Engine(format!("reading the image list: {e}")))?
                    .to_bytes();
                let list: Vec<Value> = serde_json::from_slice(&bytes)
                    .map_err(|e| Refusal::Engine(format!("the engine's image list: {e}")))?;
                let kept: Vec<Value> = list
                    .into_iter()
                    .filter(|img| {
                        let labelled = img
                            .get("Labels")
                            .and_then(|l| l.get(INSTANCE_LABEL))
                            .and_then(Value::as_str)
                            == Some(self.instance.as_str());
                        let id = img.get("Id").and_then(Value::as_str).unwrap_or("");
                        labelled || self.images.contains(id)
                    })
                    .collect();
                Ok(plain(rebuild(parts, &Value::Array(kept))))
            }
            Endpoint::ImageInspect | Endpoint::ImageRemove => {
                let name = &captures[0];
                let id = self.owned_image(name).await?;
                let removing = ep == Endpoint::ImageRemove;
                let response = self.forward(req.map(BodyExt::boxed), None).await?;
                if removing && response.status().is_success() {
                    let gone = matches!(
                        self.docker.inspect_image(&id).await,
                        Err(bollard::errors::Error::DockerResponseServerError {
                            status_code: 404,
                            ..
                        })
                    );
                    if gone {
                        self.images.update(|s| s.remove(&id));
                    }
                }
                Ok(Done {
                    response,
                    object: Some(name.clone()),
                })
            }
            Endpoint::Invisible => Err(Refusal::NotFound(format!(
                "No such object: {}",
                captures[0]
            ))),
            Endpoint::ContainerCreate => self.create_container(req).await,
            Endpoint::ContainerOp => {
                let id = &captures[0];
                self.owned_container(id).await?;
                let upgrade = req
                    .headers()
                    .contains_key(UPGRADE)
                    .then(|| hyper::upgrade::on(&mut req));
                let response = self.forward(req.map(BodyExt::boxed), upgrade).await?;
                Ok(Done {
                    response,
                    object: Some(id.clone()),
                })
            }
            Endpoint::NetworkCreate => {
                let (parts, body) = req.into_parts();
                let mut value = self.read_json(body, "network create").await?;
                let obj = value.as_object_mut().ok_or_else(|| {
                    Refusal::BadRequest("the network create body is not a JSON object".into())
                })?;
                let driver = obj.get("Driver").and_then(Value::as_str).unwrap_or("");
                if !(driver.is_empty() || driver == "bridge") {
                    return Err(Denied {
                        rule: "Driver".into(),
                        message: format!(
                            "refused by regobox's Docker policy: network Driver {driver:?} is not allowed (bridge only)"
                        ),
                    }
                    .into());
                }
                for field in ["ConfigFrom", "Ingress", "ConfigOnly", "Scope"] {
                    let set = obj
                        .get(field)
                        .is_some_and(|v| !v.is_null() && v != &Value::Bool(false) && v != "");
                    if set {
                        return Err(Denied {
                            rule: field.into(),
                            message: format!(
                                "refused by regobox's Docker policy: network {field} is not allowed"
                            ),
                        }
                        .into());
                    }
                }
                label(obj, &self.instance);
                let name = obj.get("Name").and_then(Value::as_str).map(str::to_string);
                let response = self.forward(with_json(parts, &value), None).await?;
                Ok(Done {
                    response,
                    object: name,
                })
            }
            Endpoint::NetworkOp => {
                let id = &captures[0];
                self.owned_network(id).await?;
                let connecting = req.uri().path().ends_with("/connect")
                    || req.uri().path().ends_with("/disconnect");
                let request = if connecting {
                    let (parts, body) = req.into_parts();
                    let value = self.read_json(body, "network connect").await?;
                    let container = value
                        .get("Container")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    self.owned_container(&container).await?;
                    with_json(parts, &value)
                } else {
                    req.map(BodyExt::boxed)
                };
                let response = self.forward(request, None).await?;
                Ok(Done {
                    response,
                    object: Some(id.clone()),
                })
            }
        }
    }

    async fn create_container(&self, req: Request<Incoming>) -> Result<Done, Refusal> {
        let (parts, body) = req.into_parts();
        let value = self.read_json(body, "container create").await?;
        let checked = policy::check_create(&value, &self.policy)?;
        for source in bind_sources(&value) {
            no_symlink_under_roots(Path::new(&source), &self.policy.bind_roots)?;
        }
        let image = value
            .get("Image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if image.is_empty() {
            return Err(Refusal::BadRequest(
                "the container create body names no Image".into(),
            ));
        }
        self.owned_image(&image).await?;
        // Networks other than the engine's defaults must be this instance's.
        let mut networks: Vec<String> = value
            .pointer("/HostConfig/NetworkMode")
            .and_then(Value::as_str)
            .map(str::to_string)
            .into_iter()
            .collect();
        if let Some(endpoints) = value
            .pointer("/NetworkingConfig/EndpointsConfig")
            .and_then(Value::as_object)
        {
            networks.extend(endpoints.keys().cloned());
        }
        for network in networks {
            if matches!(network.as_str(), "" | "default" | "bridge" | "none") {
                continue;
            }
            // A 404 here would make the docker CLI try to pull the image: refuse instead.
            match self.owned_network(&network).await {
                Ok(()) => {}
                Err(Refusal::NotFound(_)) => {
                    return Err(Denied {
                    rule: "HostConfig.NetworkMode".into(),
                    message: format!(
                        "refused by regobox's Docker policy: HostConfig.NetworkMode network {network:?} is not one of this instance's networks"
                    ),
                }
                .into());
                }
                Err(other) => return Err(other),
            }
        }
        let response = self.forward(with_json(parts, &checked), None).await?;
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| Refusal::Engine(format!("reading the create response: {e}")))?
            .to_bytes();
        let id = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("Id").and_then(Value::as_str).map(str::to_string));
        Ok(Done {
            response: Response::from_parts(parts, Full::new(bytes).map_err(never).boxed()),
            object: id.or(Some(image)),
        })
    }

    async fn read_json(&self, body: Incoming, what: &str) -> Result<Value, Refusal> {
        let bytes = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Refusal::TooLarge(format!(
                        "the {what} body is larger than docker.max_inspected_body ({} bytes)",
                        self.max_body
                    ))
                } else {
                    Refusal::BadRequest(format!("reading the {what} body: {e}"))
                }
            })?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::BadRequest(format!("the {what} body is not valid JSON: {e}")))
    }

    /// Whether `labels` mark an object as this instance's.
    fn labelled(&self, labels: Option<&std::collections::HashMap<String, String>>) -> bool {
        labels
            .and_then(|l| l.get(INSTANCE_LABEL))
            .is_some_and(|v| *v == self.instance)
    }

    /// An inspection's result if the object is this instance's; someone else's answers as
    /// missing.
    fn owned<T>(
        &self,
        inspected: Result<T, bollard::errors::Error>,
        ours: impl FnOnce(&T) -> bool,
        missing: String,
        what: &str,
    ) -> Result<T, Refusal> {
        match inspected {
            Ok(x) if ours(&x) => Ok(x),
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(Refusal::NotFound(missing)),
            Err(e) => Err(Refusal::Engine(format!("inspecting {what}: {e}"))),
        }
    }

    /// The image's id if it is this instance's (labelled, or pulled/imported through here).
    async fn owned_image(&self, name: &str) -> Result<String, Refusal> {
        let img = self.owned(
            self.docker.inspect_image(name).await,
            |img| {
                self.labelled(img.config.as_ref().and_then(|c| c.labels.as_ref()))
                    || self.images.contains(img.id.as_deref().unwrap_or(""))
            },
            format!("No such image: {name}"),
            &format!("image {name}"),
        )?;
        Ok(img.id.unwrap_or_default())
    }

    async fn owned_container(&self, id: &str) -> Result<(), Refusal> {
        if id.is_empty() {
            return Err(Refusal::NotFound("No such container: ".into()));
        }
        let inspected = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await;
        self.owned(
            inspected,
            |c| self.labelled(c.config.as_ref().and_then(|c| c.labels.as_ref())),
            format!("No such container: {id}"),
            &format!("container {id}"),
        )
        .map(drop)
    }

    async fn owned_network(&self, id: &str) -> Result<(), Refusal> {
        let inspected = self
            .docker
            .inspect_network(id, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await;
        self.owned(
            inspected,
            |n| self.labelled(n.labels.as_ref()),
            format!("network {id} not found"),
            &format!("network {id}"),
        )
        .map(drop)
    }

    /// Send `req` to the engine on a new connection; splice an upgrade if both sides agree.
    async fn forward(
        &self,
        mut req: Request<Body>,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, Refusal> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Refusal::Engine(format!("the Docker engine cannot be reached: {e}"))
        };
        let io = self
            .connector
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        if !req.headers().contains_key(hyper::header::HOST) {
            req.headers_mut()
                .insert(hyper::header::HOST, HeaderValue::from_static("docker"));
        }
        let mut response = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = upgrade {
                let engine = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(client), Ok(engine)) = tokio::join!(client, engine) {
                        let mut client = TokioIo::new(client);
                        let mut engine = TokioIo::new(engine);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }
        Ok(response.map(BodyExt::boxed))
    }
}

fn never(n: Infallible) -> hyper::Error {
    match n {}
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(value.to_string() + "\n"))
            .map_err(never)
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A response with `value` as its JSON body in place of the engine's.
fn rebuild(mut parts: hyper::http::response::Parts, value: &Value) -> Response<Body> {
    let bytes = Bytes::from(value.to_string());
    parts.headers.remove(TRANSFER_ENCODING);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, Full::new(bytes).map_err(never).boxed())
}

/// A request with `value` as its JSON body.
fn with_json(mut parts: hyper::http::request::Parts, value: &Value) -> Request<Body> {
    let bytes = Bytes::from(value.to_string());
    parts.headers.remove(TRANSFER_ENCODING);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Request::from_parts(parts, Full::new(bytes).map_err(never).boxed())
}

fn set_query(req: &mut Request<Incoming>, query: &str) {
    let path = req.uri().path().to_string();
    let pq = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    if let Ok(uri) = pq.parse() {
        *req.uri_mut() = uri;
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn encode_query(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The query with `label=regobox.instance=<instance>` added to its `filters` (the engine ANDs
/// label filters, so whatever else the client filters on, only this instance's objects remain).
fn with_label_filter(query: &str, instance: &str) -> Result<String, Refusal> {
    let mut pairs = parse_query(query);
    let wanted = format!("{INSTANCE_LABEL}={instance}");
    let mut filters: Map<String, Value> = match pairs.iter().find(|(k, _)| k == "filters") {
        Some((_, v)) if !v.is_empty() => serde_json::from_str(v).map_err(|e| {
            Refusal::BadRequest(format!("the filters parameter is not a JSON object: {e}"))
        })?,
        _ => Map::new(),
    };
    match filters.get_mut("label") {
        Some(Value::Array(a)) => a.push(Value::String(wanted)),
        Some(Value::Object(o)) => {
            o.insert(wanted, Value::Bool(true));
        }
        _ => {
            filters.insert("label".into(), json!([wanted]));
        }
    }
    pairs.retain(|(k, _)| k != "filters");
    pairs.push(("filters".into(), Value::Object(filters).to_string()));
    Ok(encode_query(&pairs))
}

/// `POST /build`: the instance label added to the image's labels; the host network refused.
fn build_query(query: &str, instance: &str) -> Result<String, Refusal> {
    let mut pairs = parse_query(query);
    if let Some((_, mode)) = pairs.iter().find(|(k, _)| k == "networkmode") {
        if mode == "host" || mode.starts_with("container:") {
            return Err(Denied {
                rule: "networkmode".into(),
                message: format!(
                    "refused by regobox's Docker policy: build networkmode {mode:?} shares a namespace"
                ),
            }
            .into());
        }
    }
    let mut labels: Map<String, Value> = match pairs.iter().find(|(k, _)| k == "labels") {
        Some((_, v)) if !v.is_empty() => serde_json::from_str(v).map_err(|e| {
            Refusal::BadRequest(format!("the labels parameter is not a JSON object: {e}"))
        })?,
        _ => Map::new(),
    };
    labels.insert(INSTANCE_LABEL.into(), Value::String(instance.into()));
    pairs.retain(|(k, _)| k != "labels");
    pairs.push(("labels".into(), Value::Object(labels).to_string()));
    Ok(encode_query(&pairs))
}

/// `name` with `tag` unless the name already carries a tag or digest.
fn image_ref(name: &str, tag: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if tag.is_empty() || last.contains(':') || name.contains('@') {
        name.to_string()
    } else if tag.starts_with("sha256:") {
        format!("{name}@{tag}")
    } else {
        format!("{name}:{tag}")
    }
}

/// The image id an untagged import printed (`{"status":"sha256:..."}`).
fn imported_id(tail: &[u8]) -> Option<String> {
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter_map(|v| v.get("status").and_then(Value::as_str).map(str::to_string))
        .find(|s| s.starts_with("sha256:"))
}

fn label(obj: &mut Map<String, Value>, instance: &str) {
    let labels = obj
        .entry("Labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    labels[INSTANCE_LABEL] = Value::String(instance.into());
}

/// The bind sources of a container create body, as the application named them.
fn bind_sources(body: &Value) -> Vec<String> {
    let host = body.get("HostConfig");
    let binds = host
        .and_then(|h| h.get("Binds"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|b| b.split(':').next().unwrap_or("").to_string());
    let mounts = host
        .and_then(|h| h.get("Mounts"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m.get("Type").and_then(Value::as_str) == Some("bind"))
        .filter_map(|m| m.get("Source").and_then(Value::as_str).map(str::to_string));
    binds.chain(mounts).collect()
}

/// The engine follows symbolic links in a bind source on the host, where a link the application
/// made (say `files/x -> /`) points somewhere else entirely: no component under the root may be
/// a link.
fn no_symlink_under_roots(source: &Path, roots: &[PathBuf]) -> Result<(), Denied> {
    let Some(root) = roots
        .iter()
        .filter(|r| source.starts_with(r))
        .max_by_key(|r| r.components().count())
    else {
        return Ok(()); // check_create already refused it
    };
    let mut path = root.clone();
    for part in source
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .components()
    {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Denied {
                    rule: "HostConfig.Binds".into(),
                    message: format!(
                        "refused by regobox's Docker policy: bind source {} goes through the symbolic link {}",
                        source.display(),
                        path.display()
                    ),
                });
            }
            Ok(_) => {}
            Err(_) => break, // the engine creates what is missing, as a directory
        }
    }
    Ok(())
}

type Recording = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A body that, once read to the end, runs what `f` makes of its last bytes before it says so:
/// the client sees the end of a pull only once the image is recorded as the application's.
struct OnEnd<F: FnOnce(&[u8]) -> Recording> {
    inner: Body,
    tail: Vec<u8>,
    f: Option<F>,
    /// In a mutex only to be `Sync` (it is reached through `&mut`, never locked).
    recording: Option<Mutex<Recording>>,
}

impl<F: FnOnce(&[u8]) -> Recording> OnEnd<F> {
    fn new(inner: Body, f: F) -> Self {
        OnEnd {
            inner,
            tail: Vec::new(),
            f: Some(f),
            recording: None,
        }
    }
}

const TAIL: usize = 4096;

impl<F: FnOnce(&[u8]) -> Recording + Unpin> hyper::body::Body for OnEnd<F> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(recording) = this.recording.as_mut() {
            let Ok(recording) = recording.get_mut() else {
                return Poll::Ready(None);
            };
            return match recording.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.recording = None;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tail.extend_from_slice(data);
                    if this.tail.len() > TAIL {
                        let cut = this.tail.len() - TAIL;
                        this.tail.drain(..cut);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.f.take() {
                    this.recording = Some(Mutex::new(f(&this.tail)));
                    return self.poll_frame(cx);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.f.is_none() && self.recording.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_get_the_instance_filter() {
        let q = with_label_filter("all=1", "i1").unwrap();
        let pairs = parse_query(&q);
        assert!(pairs.contains(&("all".into(), "1".into())));
        let filters: Value =
            serde_json::from_str(&pairs.iter().find(|(k, _)| k == "filters").unwrap().1).unwrap();
        assert_eq!(filters["label"], json!(["regobox.instance=i1"]));

        let q = with_label_filter(
            &encode_query(&[(
                "filters".into(),
                r#"{"label":{"app=x":true},"status":["running"]}"#.into(),
            )]),
            "i1",
        )
        .unwrap();
        let filters: Value = serde_json::from_str(
            &parse_query(&q)
                .into_iter()
                .find(|(k, _)| k == "filters")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(
            filters["label"],
            json!({"app=x": true, "regobox.instance=i1": true})
        );
        assert_eq!(filters["status"], json!(["running"]));
        assert!(matches!(
            with_label_filter("filters=notjson", "i1"),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn builds_are_labelled_and_keep_off_the_host_network() {
        let q = build_query("t=job%3A1&labels=%7B%22a%22%3A%22b%22%7D", "i1").unwrap();
        let labels: Value = serde_json::from_str(
            &parse_query(&q)
                .into_iter()
                .find(|(k, _)| k == "labels")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(labels, json!({"a": "b", "regobox.instance": "i1"}));
        assert!(matches!(
            build_query("networkmode=host", "i1"),
            Err(Refusal::Denied(_))
        ));
    }

    #[test]
    fn image_references() {
        assert_eq!(image_ref("busybox", "latest"), "busybox:latest");
        assert_eq!(image_ref("reg:5000/a/b", "1"), "reg:5000/a/b:1");
        assert_eq!(image_ref("a/b:2", "1"), "a/b:2");
        assert_eq!(image_ref("a", "sha256:ab"), "a@sha256:ab");
        assert_eq!(
            imported_id(b"{\"status\":\"sha256:abc\"}\r\n").as_deref(),
            Some("sha256:abc")
        );
    }

    #[test]
    fn symlinks_under_a_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("job/real")).unwrap();
        std::os::unix::fs::symlink("/", root.join("job/escape")).unwrap();
        let roots = vec![root.clone()];
        assert!(no_symlink_under_roots(&root.join("job/real/out"), &roots).is_ok());
        assert!(no_symlink_under_roots(&root.join("job/new/deeper"), &roots).is_ok());
        let d = no_symlink_under_roots(&root.join("job/escape/etc"), &roots).unwrap_err();
        assert!(d.message.contains("symbolic link"), "{}", d.message);
    }
}
