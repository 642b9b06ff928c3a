//! System-internal TLS (`config-network`'s `system-internal-tls`), as upstream's activator does
//! it: the certificate it serves on its TLS port (`tls.crt`/`tls.key` of Secret
//! `routing-serving-certs`), and the trust it verifies pods with (that Secret's `ca.crt` plus every
//! certificate in every ConfigMap of the system namespace labelled
//! `networking.knative.dev/trust-bundle`), both replaced live as the watches change them; the
//! server settings of `ACTIVATOR_TLS_*`.
//!
//! A pod (queue-proxy's TLS port) is verified as upstream's `certificate.CertCache` does: a chain
//! to that trust, valid for `data-plane.knative.dev` (the name sent as SNI) and for
//! `kn-user-<namespace>` of the revision. rustls with ring, so no OpenSSL. Owns certificates and
//! handshakes; must not choose what is served or dialled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus::IntCounter;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme, SupportedCipherSuite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::labelled::{Labelled, label_values};
use crate::metrics::Registrar;
use crate::sync::lock;

/// The name queue-proxy's certificate carries for every namespace, sent as SNI
/// (`certificates.LegacyFakeDnsName`).
pub(crate) const DATA_PLANE_NAME: &str = "data-plane.knative.dev";
/// The Secret with the activator's own certificate and the CA pods are signed by.
pub(crate) const SECRET: &str = "routing-serving-certs";
/// Marks a ConfigMap of the system namespace as a bundle of CAs to trust (any value).
pub(crate) const TRUST_BUNDLE_LABEL: &str = "networking.knative.dev/trust-bundle";

label_values! {
    /// The side of a system-internal TLS handshake that failed.
    pub(crate) enum Peer {
        /// A client of the TLS port.
        Client = "client",
        /// A pod whose certificate was refused.
        Pod = "pod",
    }
}

/// System-internal TLS handshakes that failed, by peer.
#[derive(Clone)]
pub(crate) struct HandshakeFailures(Labelled<Peer, IntCounter>);

impl HandshakeFailures {
    pub(crate) fn register(reg: &Registrar) -> Self {
        let family = reg.counter_vec(
            "activator_tls_handshakes_failed_total",
            "System-internal TLS handshakes that failed: with clients of the TLS port, or with pods whose certificate was refused",
            &["peer"],
        );
        HandshakeFailures(Labelled::new(&family, &[]))
    }

    pub(crate) fn count(&self, peer: Peer) {
        self.0.get(peer).inc();
    }
}
/// queue-proxy's TLS port on a pod, and the private Service's.
pub(crate) const POD_TLS_PORT: u16 = 8112;
pub(crate) const SERVICE_TLS_PORT: u16 = 443;

/// The name a pod's certificate must also carry for the revision's namespace
/// (`certificates.DataPlaneUserSAN`).
pub(crate) fn user_san(namespace: &str) -> String {
    format!("kn-user-{}", namespace.to_ascii_lowercase())
}

/// `ACTIVATOR_TLS_*`, read as upstream's `knative.dev/pkg/network/tls.DefaultConfigFromEnv`.
#[derive(Clone, Debug)]
pub(crate) struct ServerSettings {
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    provider: Arc<CryptoProvider>,
}

impl ServerSettings {
    /// From the variables `var` reads; a value upstream would refuse is an error naming it.
    pub(crate) fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let version = |name: &str| -> Result<Option<u8>, String> {
            match var(name).filter(|v| !v.is_empty()).as_deref() {
                None => Ok(None),
                Some("1.2") => Ok(Some(2)),
                Some("1.3") => Ok(Some(3)),
                Some(other) => Err(format!("{name} {other:?}: unsupported TLS version, must be \"1.2\" or \"1.3\"")),
            }
        };
        // Upstream's default minimum is TLS 1.3; its maximum is Go's, also 1.3.
        let min = version("ACTIVATOR_TLS_MIN_VERSION")?.unwrap_or(3);
        let max = version("ACTIVATOR_TLS_MAX_VERSION")?.unwrap_or(3);
        let versions: Vec<&'static rustls::SupportedProtocolVersion> =
            [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
                .into_iter()
                .filter(|(v, _)| (min..=max).contains(v))
                .map(|(_, version)| version)
                .collect();
        if versions.is_empty() {
            return Err(format!("ACTIVATOR_TLS_MIN_VERSION 1.{min} is above ACTIVATOR_TLS_MAX_VERSION 1.{max}"));
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(list) = var("ACTIVATOR_TLS_CIPHER_SUITES").filter(|v| !v.is_empty()) {
            let mut suites = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                suites.push(cipher_suite(name)?);
            }
            // TLS 1.3's suites are not chosen in Go; they stay as rustls has them.
            suites.extend(provider.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS13));
            provider.cipher_suites = suites;
        }
        if let Some(list) = var("ACTIVATOR_TLS_CURVE_PREFERENCES").filter(|v| !v.is_empty()) {
            let mut groups = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                groups.push(curve(name)?);
            }
            provider.kx_groups = groups;
        }
        Ok(ServerSettings { versions, provider: Arc::new(provider) })
    }
}

/// A cipher suite by Go's name (`tls.CipherSuites()`); the CBC suites Go also lists are not
/// offered by rustls and are refused by name.
fn cipher_suite(name: &str) -> Result<SupportedCipherSuite, String> {
    use rustls::crypto::ring::cipher_suite as s;
    Ok(match name {
        "TLS_AES_128_GCM_SHA256" => s::TLS13_AES_128_GCM_SHA256,
        "TLS_AES_256_GCM_SHA384" => s::TLS13_AES_256_GCM_SHA384,
        "TLS_CHACHA20_POLY1305_SHA256" => s::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => s::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => s::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            s::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => s::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => s::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            s::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        other => return Err(format!("ACTIVATOR_TLS_CIPHER_SUITES: unknown or unsupported cipher suite {other:?}")),
    })
}

/// A key exchange group by Go's name; P-521 and X25519MLKEM768 are not in ring and are refused.
fn curve(name: &str) -> Result<&'static dyn SupportedKxGroup, String> {
    use rustls::crypto::ring::kx_group as k;
    Ok(match name {
        "X25519" => k::X25519,
        "CurveP256" | "P-256" => k::SECP256R1,
        "CurveP384" | "P-384" => k::SECP384R1,
        other => return Err(format!("ACTIVATOR_TLS_CURVE_PREFERENCES: unknown or unsupported curve {other:?}")),
    })
}

/// The certificates and trust of system-internal TLS, as the watches last reported them.
pub(crate) struct InternalTls {
    /// `config-network` asks for system-internal TLS: the TLS port serves while it does.
    enabled: AtomicBool,
    provider: Arc<CryptoProvider>,
    served: ArcSwapOption<CertifiedKey>,
    /// The Secret's `ca.crt` and the trust bundles, as last read.
    sources: Mutex<TrustSources>,
    roots: ArcSwap<RootCertStore>,
    /// Client configurations by namespace and protocol, for the roots in `roots` (cleared when
    /// they change).
    clients: Mutex<HashMap<(String, bool), Arc<ClientConfig>>>,
}

#[derive(Default)]
struct TrustSources {
    secret_ca: Vec<CertificateDer<'static>>,
    bundles: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for InternalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalTls").field("serving", &self.served.load().is_some()).finish()
    }
}

impl Default for InternalTls {
    fn default() -> Self {
        InternalTls {
            enabled: AtomicBool::new(false),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            served: ArcSwapOption::empty(),
            sources: Mutex::default(),
            roots: ArcSwap::from_pointee(RootCertStore::empty()),
            clients: Mutex::default(),
        }
    }
}

impl InternalTls {
    /// The Secret `routing-serving-certs` changed. A pair that does not read keeps the previous
    /// certificate (upstream's `updateCertificate`); `ca.crt`'s first certificate is trusted.
    pub(crate) fn set_secret(&self, data: &std::collections::BTreeMap<String, Vec<u8>>) -> Result<(), String> {
        let ca = data.get("ca.crt").and_then(|pem| CertificateDer::pem_slice_iter(pem).next()?.ok());
        lock(&self.sources).secret_ca = ca.into_iter().collect();
        self.rebuild_roots();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(data.get("tls.crt").map_or(&[][..], Vec::as_slice))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{SECRET} tls.crt: {e}"))?;
        if chain.is_empty() {
            return Err(format!("{SECRET} tls.crt holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(data.get("tls.key").map_or(&[][..], Vec::as_slice))
            .map_err(|e| format!("{SECRET} tls.key: {e}"))?;
        let key = CertifiedKey::from_der(chain, key, &self.provider).map_err(|e| format!("{SECRET}: {e}"))?;
        self.served.store(Some(Arc::new(key)));
        Ok(())
    }

    /// The trust bundles now: every certificate in every data value of each labelled ConfigMap.
    /// Values holding something else are reported and skipped.
    pub(crate) fn set_bundles<'a>(&self, values: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bundles = Vec::new();
        for (name, pem) in values {
            match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
                Ok(certs) if !certs.is_empty() => bundles.extend(certs),
                Ok(_) => problems.push(format!("trust bundle {name} holds no certificate")),
                Err(e) => problems.push(format!("trust bundle {name}: {e}")),
            }
        }
        lock(&self.sources).bundles = bundles;
        self.rebuild_roots();
        problems
    }

    fn rebuild_roots(&self) {
        let sources = lock(&self.sources);
        let mut roots = RootCertStore::empty();
        for cert in sources.secret_ca.iter().chain(&sources.bundles) {
            if let Err(e) = roots.add(cert.clone()) {
                tracing::warn!(error = %e, "a CA certificate for pods is invalid and ignored");
            }
        }
        drop(sources);
        self.roots.store(Arc::new(roots));
        lock(&self.clients).clear();
    }

    pub(crate) fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether the TLS port serves now: enabled, with a certificate to serve.
    pub(crate) fn serving(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.served.load().is_some()
    }

    /// The TLS configuration of the activator's own TLS port: the Secret's certificate as it is at
    /// each handshake, HTTP/2 and HTTP/1.1 by ALPN, no client certificate (as upstream).
    pub(crate) fn server_config(self: &Arc<Self>, settings: &ServerSettings) -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(settings.provider.clone())
            .with_protocol_versions(&settings.versions)
            .map_err(|e| format!("ACTIVATOR_TLS_*: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Served(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS connection over `tcp` to a pod (or private Service) of a revision in `namespace`,
    /// verified as upstream verifies queue-proxy; `h2` asks for HTTP/2 by ALPN.
    pub(crate) async fn connect(
        &self,
        tcp: TcpStream,
        namespace: &str,
        h2: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.client_config(namespace, h2);
        let name = ServerName::try_from(DATA_PLANE_NAME).expect("a valid DNS name");
        TlsConnector::from(config).connect(name, tcp).await
    }

    fn client_config(&self, namespace: &str, h2: bool) -> Arc<ClientConfig> {
        let mut clients = lock(&self.clients);
        let key = (namespace.to_owned(), h2);
        if let Some(config) = clients.get(&key) {
            return config.clone();
        }
        let roots = self.roots.load_full();
        let verifier: Arc<dyn ServerCertVerifier> =
            match WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone()).build() {
                Ok(webpki) => Arc::new(KnativeVerifier {
                    webpki,
                    user: ServerName::try_from(user_san(namespace)).map_err(|_| ()).ok(),
                }),
                // No roots at all: nothing can be trusted, every handshake fails.
                Err(_) => Arc::new(NothingTrusted(self.provider.clone())),
            };
        // Upstream's client asks for TLS 1.3 at least.
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring offers TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let config = Arc::new(config);
        clients.insert(key, config.clone());
        config
    }

    /// An acceptor for the activator's TLS port, when there is a certificate to serve.
    pub(crate) fn acceptor(self: &Arc<Self>, settings: &ServerSettings) -> Option<TlsAcceptor> {
        if !self.serving() {
            return None;
        }
        match self.server_config(settings) {
            Ok(config) => Some(TlsAcceptor::from(config)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve TLS");
                None
            }
        }
    }
}

/// Hands out the certificate as it is at each handshake, so a rotated Secret serves at once.
#[derive(Debug)]
struct Served(Arc<InternalTls>);

impl ResolvesServerCert for Served {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.served.load_full()
    }
}

/// webpki's verification against the trust, for `data-plane.knative.dev` and then for the
/// namespace's `kn-user-<namespace>` (upstream's `verifySAN`).
#[derive(Debug)]
struct KnativeVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// `None` for a namespace that makes no DNS name, which no certificate can then match.
    user: Option<ServerName<'static>>,
}

impl ServerCertVerifier for KnativeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let user =
            self.user.as_ref().ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        self.webpki.verify_server_cert(end_entity, intermediates, user, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Refuses every certificate: no CA is configured yet.
#[derive(Debug)]
struct NothingTrusted(Arc<CryptoProvider>);

impl ServerCertVerifier for NothingTrusted {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
