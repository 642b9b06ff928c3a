//! `logging.request-log-template`: the part of Go's `text/template` that request-log templates
//! use, rendered over the fields upstream's activator gives them (`pkg/http/request_log.go`
//! `RequestLogTemplateInput`). A template is parsed once, when `config-observability` changes; one
//! that uses anything this does not render (conditions, ranges, variables, an unknown field) is
//! refused then, with a message naming it, so no request ever meets a template it cannot write.
//!
//! Renders values only; must not decide whether a line is written.

use std::fmt::Write as _;

/// What one request-log line can say, by Go's field names.
#[derive(Debug, Default)]
pub(crate) struct Input<'a> {
    pub method: &'a str,
    /// The request target as the client sent it (`RequestURI`), which is also what Go prints for
    /// the server request's `URL`.
    pub request_uri: &'a str,
    pub path: &'a str,
    pub raw_query: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub proto: &'static str,
    pub host: &'a str,
    pub remote_addr: String,
    /// `-1` when unknown, as Go's `Request.ContentLength`.
    pub content_length: i64,
    pub user_agent: &'a str,
    pub referer: &'a str,
    pub code: u16,
    pub size: u64,
    /// Seconds, as upstream's `Response.Latency`.
    pub latency: f64,
    pub revision: &'a str,
    pub namespace: &'a str,
    pub service: &'a str,
    pub configuration: &'a str,
    /// Upstream's activator leaves these empty; so do we.
    pub pod_name: &'a str,
    pub pod_ip: &'a str,
    pub trace_id: &'a str,
}

/// A field of `Input`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Method,
    RequestUri,
    Url,
    UrlPath,
    UrlRawQuery,
    Proto,
    Host,
    RemoteAddr,
    ContentLength,
    UserAgent,
    Referer,
    Code,
    Size,
    Latency,
    Revision,
    Namespace,
    Service,
    Configuration,
    PodName,
    PodIp,
    TraceId,
}

impl Field {
    fn named(path: &str) -> Option<Field> {
        Some(match path {
            ".Request.Method" => Field::Method,
            ".Request.RequestURI" => Field::RequestUri,
            ".Request.URL" => Field::Url,
            ".Request.URL.Path" => Field::UrlPath,
            ".Request.URL.RawQuery" => Field::UrlRawQuery,
            ".Request.Proto" => Field::Proto,
            ".Request.Host" => Field::Host,
            ".Request.RemoteAddr" => Field::RemoteAddr,
            ".Request.ContentLength" => Field::ContentLength,
            ".Request.UserAgent" => Field::UserAgent,
            ".Request.Referer" => Field::Referer,
            ".Response.Code" => Field::Code,
            ".Response.Size" => Field::Size,
            ".Response.Latency" => Field::Latency,
            ".Revision.Name" => Field::Revision,
            ".Revision.Namespace" => Field::Namespace,
            ".Revision.Service" => Field::Service,
            ".Revision.Configuration" => Field::Configuration,
            ".Revision.PodName" => Field::PodName,
            ".Revision.PodIP" => Field::PodIp,
            ".TraceID" => Field::TraceId,
            _ => return None,
        })
    }

    /// The value as Go's `fmt.Sprint` prints it.
    fn write(self, input: &Input<'_>, out: &mut String) {
        let text = match self {
            Field::Method => input.method,
            Field::RequestUri | Field::Url => input.request_uri,
            Field::UrlPath => input.path,
            Field::UrlRawQuery => input.raw_query,
            Field::Proto => input.proto,
            Field::Host => input.host,
            Field::RemoteAddr => &input.remote_addr,
            Field::UserAgent => input.user_agent,
            Field::Referer => input.referer,
            Field::Revision => input.revision,
            Field::Namespace => input.namespace,
            Field::Service => input.service,
            Field::Configuration => input.configuration,
            Field::PodName => input.pod_name,
            Field::PodIp => input.pod_ip,
            Field::TraceId => input.trace_id,
            Field::ContentLength => return write!(out, "{}", input.content_length).unwrap_or(()),
            Field::Code => return write!(out, "{}", input.code).unwrap_or(()),
            Field::Size => return write!(out, "{}", input.size).unwrap_or(()),
            Field::Latency => return out.push_str(&go_float(input.latency)),
        };
        out.push_str(text);
    }
}

/// The escaping functions templates call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    Js,
    Html,
    UrlQuery,
}

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    Value(Escape, Field),
}

/// A parsed request-log template.
#[derive(Debug, PartialEq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text` as Go's `text/template` would, for the actions this renders; upstream
    /// appends a newline to a template without one.
    pub(crate) fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut trim_next = false;
        while !rest.is_empty() {
            let Some(open) = rest.find("{{") else {
                push_text(&mut parts, rest, trim_next, false);
                break;
            };
            let inner_start = open + 2;
            let trim_before = rest[inner_start..].starts_with("- ");
            push_text(&mut parts, &rest[..open], trim_next, trim_before);
            let close = rest[inner_start..].find("}}").ok_or("an action is not closed with }}")? + inner_start;
            let mut action = &rest[inner_start..close];
            if trim_before {
                action = &action[2..];
            }
            trim_next = action.ends_with(" -");
            if trim_next {
                action = &action[..action.len() - 2];
            }
            let action = action.trim();
            if !(action.starts_with("/*") && action.ends_with("*/")) {
                parts.push(Self::action(action)?);
            }
            rest = &rest[close + 2..];
        }
        if !text.ends_with('\n') {
            parts.push(Part::Text("\n".to_owned()));
        }
        Ok(Template { parts })
    }

    fn action(action: &str) -> Result<Part, String> {
        let words: Vec<&str> = action.split_whitespace().collect();
        let unsupported = || {
            format!(
                "{{{{{action}}}}} is not a field, or js, html, urlquery or print of one field: the only actions \
                 request-log templates render here"
            )
        };
        let (escape, path) = match words.as_slice() {
            [path] => (Escape::None, *path),
            ["js", path] => (Escape::Js, *path),
            ["html", path] => (Escape::Html, *path),
            ["urlquery", path] => (Escape::UrlQuery, *path),
            ["print", path] => (Escape::None, *path),
            _ => return Err(unsupported()),
        };
        if !path.starts_with('.') {
            return Err(unsupported());
        }
        let field = Field::named(path).ok_or_else(|| format!("{path} is not a field of the request log's input"))?;
        Ok(Part::Value(escape, field))
    }

    /// One line for `input`, ending in a newline.
    pub(crate) fn render(&self, input: &Input<'_>) -> String {
        let mut out = String::with_capacity(256);
        let mut value = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Value(Escape::None, field) => field.write(input, &mut out),
                Part::Value(escape, field) => {
                    value.clear();
                    field.write(input, &mut value);
                    match escape {
                        Escape::Js => js_escape(&value, &mut out),
                        Escape::Html => html_escape(&value, &mut out),
                        Escape::UrlQuery => out.extend(form_urlencoded::byte_serialize(value.as_bytes())),
                        Escape::None => out.push_str(&value),
                    }
                }
            }
        }
        out
    }
}

/// Text between actions, with the whitespace a `-` trim marker next to it removes.
fn push_text(parts: &mut Vec<Part>, text: &str, trim_start: bool, trim_end: bool) {
    let text = if trim_start { text.trim_start() } else { text };
    let text = if trim_end { text.trim_end() } else { text };
    if !text.is_empty() {
        parts.push(Part::Text(text.to_owned()));
    }
}

/// A float as Go's `%v` prints it: the shortest form, in exponent notation below 1e-4 or from
/// 1e21 (`1.2e-05`).
pub(super) fn go_float(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let exponent = value.abs().log10().floor() as i32;
    if !(-4..21).contains(&exponent) {
        let scientific = format!("{value:e}");
        if let Some((mantissa, exp)) = scientific.split_once('e') {
            let exp: i32 = exp.parse().unwrap_or(0);
            let sign = if exp < 0 { '-' } else { '+' };
            return format!("{mantissa}e{sign}{:02}", exp.abs());
        }
    }
    format!("{value}")
}

/// Go's `template.JSEscapeString`.
fn js_escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '"' => out.push_str("\\\""),
            '<' => out.push_str("\\u003C"),
            '>' => out.push_str("\\u003E"),
            '&' => out.push_str("\\u0026"),
            '=' => out.push_str("\\u003D"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c if c.is_ascii() => out.push(c),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Go's `template.HTMLEscapeString`.
fn html_escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Upstream's `DefaultRequestLogTemplate` (`pkg/observability/config.go`).
    const UPSTREAMS_DEFAULT: &str = r#"{"httpRequest": {"requestMethod": "{{.Request.Method}}", "requestUrl": "{{js .Request.RequestURI}}", "requestSize": "{{.Request.ContentLength}}", "status": {{.Response.Code}}, "responseSize": "{{.Response.Size}}", "userAgent": "{{js .Request.UserAgent}}", "remoteIp": "{{js .Request.RemoteAddr}}", "serverIp": "{{.Revision.PodIP}}", "referer": "{{js .Request.Referer}}", "latency": "{{.Response.Latency}}s", "protocol": "{{.Request.Proto}}"}, "traceId": "{{.TraceID}}"}"#;

    fn input() -> Input<'static> {
        Input {
            method: "GET",
            request_uri: "/incr?q=<a>&b='c'",
            proto: "HTTP/1.1",
            host: "counter.example.com",
            remote_addr: "10.0.0.9:41000".into(),
            content_length: 0,
            user_agent: "curl/8.5",
            code: 200,
            size: 21,
            latency: 0.001234,
            revision: "counter-00001",
            namespace: "default",
            service: "counter",
            configuration: "counter",
            ..Input::default()
        }
    }

    #[test]
    fn upstreams_default_template_renders_as_go_would() {
        let line = Template::parse(UPSTREAMS_DEFAULT).unwrap().render(&input());
        assert_eq!(
            line,
            "{\"httpRequest\": {\"requestMethod\": \"GET\", \"requestUrl\": \"/incr?q\\u003D\\u003Ca\\u003E\\u0026b\\u003D\\'c\\'\", \
             \"requestSize\": \"0\", \"status\": 200, \"responseSize\": \"21\", \"userAgent\": \"curl/8.5\", \
             \"remoteIp\": \"10.0.0.9:41000\", \"serverIp\": \"\", \"referer\": \"\", \"latency\": \"0.001234s\", \
             \"protocol\": \"HTTP/1.1\"}, \"traceId\": \"\"}\n"
        );
    }

    /// `cmd/activator/request_log_test.go`'s "revision info" case.
    #[test]
    fn revision_fields_and_trim_markers() {
        let template = Template::parse(
            "{{.Revision.Name}}, {{.Revision.Namespace}}, {{.Revision.Service}}, {{.Revision.Configuration}}, \
             {{.Revision.PodName}}, {{.Revision.PodIP}}  {{- /* a comment */ -}}  ",
        )
        .unwrap();
        assert_eq!(template.render(&input()), "counter-00001, default, counter, counter, , \n");
    }

    #[test]
    fn what_is_not_rendered_is_refused_when_parsed() {
        for bad in [
            "{{if .Request.Method}}x{{end}}",
            "{{.Request.Header}}",
            "{{.Nope}}",
            "{{printf \"%s\" .Request.Method}}",
            "{{$x := 1}}",
            "{{.Request.Method",
            "{{}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn floats_print_as_gos_percent_v() {
        assert_eq!(go_float(0.5), "0.5");
        assert_eq!(go_float(0.000123), "0.000123");
        assert_eq!(go_float(0.000012), "1.2e-05");
        assert_eq!(go_float(12.25), "12.25");
        assert_eq!(go_float(0.0), "0");
    }

    proptest! {
        #[test]
        fn any_template_parses_or_is_refused_and_renders_without_panicking(text in "(\\PC|\\{\\{|\\}\\}| -){0,40}") {
            if let Ok(template) = Template::parse(&text) {
                prop_assert!(template.render(&input()).ends_with('\n'));
            }
        }
    }
}
