//! The registry side of `d7q pull`: image references, authentication (Basic, Bearer tokens,
//! `~/.docker/config.json`), manifests and platform selection, and writing an image to disk
//! as an OCI image layout or a docker-archive.
//!
//! - [`reference`]: `alpine`, `host:port/name:tag`, `name@sha256:…` with Docker Hub defaults.
//! - [`auth`]: challenges, credentials, token responses, the coalescing token cache.
//! - [`manifest`]: indexes, manifest lists, image manifests; bounded parsing; platforms.
//! - [`client`]: manifests over HTTPS with the authentication dance.
//! - [`layout`]: OCI image layout and docker-archive writers.
//!
//! Not for: blob bytes, which travel through the mesh ([`crate::pull`]), or the daemon's
//! HTTPS proxy.

pub mod auth;
pub mod client;
pub mod layout;
pub mod manifest;
pub mod reference;

pub use client::{FetchedManifest, RegistryClient, RegistryError};
pub use manifest::{Descriptor, Manifest, Platform};
pub use reference::Reference;
