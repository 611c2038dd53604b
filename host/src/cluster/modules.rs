//! The cluster's modules: bytes in the `vulcan_modules` object store (each
//! node keeps a checked copy of what it runs), who uploaded what in
//! `vulcan_module_owners`, and deletions told to every node.
//!
//! Ownership is cluster-wide: a tenant sees, runs and deletes only modules
//! it uploaded itself, through any node; the bytes go once no tenant has
//! them (an admin's delete takes them from everyone).

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::{Cluster, ClusterError, MODULE_DELETED_SUBJECT, now_ms};
use crate::engine::CompiledModule;
use crate::registry::RegistryError;
use crate::store::{ModuleInfo, StoreError};

/// The key naming `tenant`'s upload of `hash`.
fn owner_key(hash: &str, tenant: &str) -> String {
    format!("{}.{tenant}", hash.trim_start_matches("sha256:"))
}

/// A module's info from its object's metadata (kind and first-seen time
/// ride along with the bytes, see [`Cluster::share_module`]).
fn info_of(object: &jetstream::object_store::ObjectInfo) -> ModuleInfo {
    let field = |key: &str| object.metadata.get(key).cloned();
    ModuleInfo {
        hash: format!("sha256:{}", object.name),
        kind: field("kind").unwrap_or_else(|| "unknown".to_owned()),
        size: object.size as u64,
        created_at: field("created_at")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
    }
}

impl Cluster {
    /// Stores a module's bytes in the cluster (once) and on this node,
    /// compiled in `owner`'s turn (see the registry).
    pub async fn share_module(
        &self,
        owner: Option<&str>,
        bytes: Bytes,
    ) -> Result<(crate::store::ModuleInfo, bool), ClusterError> {
        self.connected()?;
        let (info, _, new) = self
            .node
            .registry()
            .register_for(owner, bytes.clone())
            .await
            .map_err(registry_error)?;
        let name = info.hash.trim_start_matches("sha256:").to_owned();
        let shared = self.modules.info(&name).await.is_ok_and(|i| !i.deleted);
        if !shared {
            // Kind and first-seen time ride along, so any node can list the
            // cluster's modules without fetching and compiling them.
            let meta = jetstream::object_store::ObjectMetadata {
                name: name.clone(),
                metadata: [
                    ("kind".to_owned(), info.kind.clone()),
                    ("created_at".to_owned(), info.created_at.to_string()),
                ]
                .into(),
                ..Default::default()
            };
            self.modules
                .put(meta, &mut bytes.as_ref())
                .await
                .map_err(ClusterError::unavailable)?;
        }
        Ok((info, new || !shared))
    }

    /// Deletes a module from the cluster and from every node (each drops
    /// its copy when told on [`MODULE_DELETED_SUBJECT`]); refused while a
    /// pending or running workload uses it.
    pub async fn delete_module(&self, hash: &str) -> Result<(), ClusterError> {
        self.connected()?;
        self.catch_up().await?;
        if self.index.summaries.uses_module(hash).await? {
            return Err(ClusterError::Registry(RegistryError::InUse(
                hash.to_owned(),
            )));
        }
        // Everyone's upload of it goes with it.
        let hex = hash.trim_start_matches("sha256:");
        for (_, tenant) in self
            .owner_keys()
            .await?
            .into_iter()
            .filter(|(h, _)| h == hex)
        {
            self.owners
                .purge(owner_key(hash, &tenant))
                .await
                .map_err(ClusterError::unavailable)?;
        }
        let name = hash.trim_start_matches("sha256:");
        let shared = self.modules.info(name).await.is_ok_and(|i| !i.deleted);
        if shared {
            self.modules
                .delete(name)
                .await
                .map_err(ClusterError::unavailable)?;
        }
        let here = self.forget_module(hash).await;
        if !shared && !here {
            return Err(ClusterError::ModuleNotFound(hash.to_owned()));
        }
        let payload = Bytes::from(hash.to_owned());
        let headers = match &self.signer {
            Some(signer) => signer.sign(MODULE_DELETED_SUBJECT, &payload),
            None => Default::default(),
        };
        self.client
            .publish_with_headers(MODULE_DELETED_SUBJECT, headers, payload)
            .await
            .map_err(ClusterError::unavailable)?;
        Ok(())
    }

    /// Drops this node's copy of a module; true if it had one.
    async fn forget_module(&self, hash: &str) -> bool {
        let stored = match self.node.db().delete_module(hash, None).await {
            Ok(_) => true,
            Err(StoreError::ModuleNotFound(_)) => false,
            Err(e) => {
                tracing::warn!(module = hash, error = %e, "a deleted module's copy stays on this node");
                false
            }
        };
        self.node.registry().forget(hash) || stored
    }

    /// Drops the copies of modules other nodes deleted.
    pub(super) async fn take_module_deletions(
        self: Arc<Self>,
        mut notices: async_nats::Subscriber,
    ) {
        while let Some(message) = notices.next().await {
            if let Some(signer) = &self.signer
                && let Some(why) = signer.refusal(
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                )
            {
                tracing::warn!("refusing a module deletion notice: {why}");
                continue;
            }
            // Dropped only once the cluster no longer has it: a notice (even a
            // forged one) can cost no more than one lookup.
            if let Ok(hash) = std::str::from_utf8(&message.payload) {
                let name = hash.trim_start_matches("sha256:");
                let gone = match self.modules.info(name).await {
                    Ok(info) => info.deleted,
                    Err(e) => e.kind() == jetstream::object_store::InfoErrorKind::NotFound,
                };
                if gone {
                    self.forget_module(hash).await;
                }
            }
        }
    }

    /// Up to `limit` of the cluster's modules after `offset`, newest first,
    /// and how many there are.
    pub async fn list_modules(
        &self,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<crate::store::ModuleInfo>, u64), ClusterError> {
        self.connected()?;
        let mut list = self
            .modules
            .list()
            .await
            .map_err(ClusterError::unavailable)?;
        let mut modules = Vec::new();
        while let Some(object) = list.next().await {
            let object = object.map_err(ClusterError::unavailable)?;
            if object.deleted {
                continue;
            }
            modules.push(info_of(&object));
        }
        modules.sort_by(|a, b| (b.created_at, &a.hash).cmp(&(a.created_at, &b.hash)));
        let total = modules.len() as u64;
        let page = modules.into_iter().skip(offset).take(limit).collect();
        Ok((page, total))
    }

    /// The compiled module for `hash`: this node's, or the cluster's bytes
    /// checked against the hash and stored here.
    pub async fn module(&self, hash: &str) -> Result<Arc<CompiledModule>, ClusterError> {
        match self.node.registry().get(hash).await {
            Ok(compiled) => return Ok(compiled),
            Err(RegistryError::NotFound(_)) => {}
            Err(e) => return Err(registry_error(e)),
        }
        // One fetch at a time: concurrent first runs of a module wait for
        // the first one's copy instead of each fetching and compiling it.
        let _fetching = self.fetching.lock().await;
        if self.node.registry().has(hash).await {
            return self.node.registry().get(hash).await.map_err(registry_error);
        }
        let name = hash.trim_start_matches("sha256:");
        let mut object = match self.modules.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Err(ClusterError::ModuleNotFound(hash.to_owned()));
            }
            Err(e) => return Err(ClusterError::unavailable(e)),
        };
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(ClusterError::unavailable)?;
        let got = crate::registry::module_hash(&bytes);
        if got != hash {
            return Err(anyhow::anyhow!(
                "the cluster's copy of module {hash} has the wrong hash ({got}); refusing it"
            )
            .into());
        }
        let (_, compiled, _) = self
            .node
            .registry()
            .register(Bytes::from(bytes))
            .await
            .map_err(registry_error)?;
        Ok(compiled)
    }

    /// Records that `tenant` uploaded `hash`: when it first did, and
    /// whether this upload was its first.
    pub async fn own_module(&self, tenant: &str, hash: &str) -> Result<(i64, bool), ClusterError> {
        let key = owner_key(hash, tenant);
        let now = now_ms();
        match self.owners.create(&key, Bytes::from(now.to_string())).await {
            Ok(_) => Ok((now, true)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.module_owned(tenant, hash).await? {
                    Some(first) => Ok((first, false)),
                    None => Err(ClusterError::Unavailable(
                        "the module's owner changed".into(),
                    )),
                }
            }
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// When `tenant` first uploaded `hash`, if it did (and has not deleted it).
    pub async fn module_owned(
        &self,
        tenant: &str,
        hash: &str,
    ) -> Result<Option<i64>, ClusterError> {
        self.connected()?;
        let entry = self
            .owners
            .entry(owner_key(hash, tenant))
            .await
            .map_err(ClusterError::unavailable)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse().ok()))
    }

    /// Every owner key, as (hex hash, tenant).
    async fn owner_keys(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let mut keys = match self.owners.keys().await {
            Ok(keys) => keys,
            Err(e) => return Err(ClusterError::unavailable(e)),
        };
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(ClusterError::unavailable)?;
            if let Some((hash, tenant)) = key.split_once('.') {
                out.push((hash.to_owned(), tenant.to_owned()));
            }
        }
        Ok(out)
    }

    /// `tenant`'s uploads, newest first, a page at a time, and how many.
    pub async fn list_owned_modules(
        &self,
        tenant: &str,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<ModuleInfo>, u64), ClusterError> {
        self.connected()?;
        let mut modules = Vec::new();
        for (hash, owner) in self.owner_keys().await? {
            if owner != tenant {
                continue;
            }
            let hash = format!("sha256:{hash}");
            let (Some(info), Some(first)) = (
                self.module_info(&hash).await?,
                self.module_owned(tenant, &hash).await?,
            ) else {
                continue;
            };
            modules.push(ModuleInfo {
                created_at: first,
                ..info
            });
        }
        modules.sort_by(|a, b| (b.created_at, &a.hash).cmp(&(a.created_at, &b.hash)));
        let total = modules.len() as u64;
        Ok((
            modules.into_iter().skip(offset).take(limit).collect(),
            total,
        ))
    }

    /// A module's info as the cluster holds it, if it does.
    pub async fn module_info(&self, hash: &str) -> Result<Option<ModuleInfo>, ClusterError> {
        self.connected()?;
        let name = hash.trim_start_matches("sha256:");
        match self.modules.info(name).await {
            Ok(object) if !object.deleted => Ok(Some(info_of(&object))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClusterError::unavailable(e)),
        }
    }

    /// Takes back `tenant`'s upload of `hash`; the bytes go (from every
    /// node) once no tenant has it. Refused while a pending or running
    /// workload uses it.
    pub async fn disown_module(&self, tenant: &str, hash: &str) -> Result<(), ClusterError> {
        if self.module_owned(tenant, hash).await?.is_none() {
            return Err(ClusterError::ModuleNotFound(hash.to_owned()));
        }
        self.catch_up().await?;
        if self.index.summaries.uses_module(hash).await? {
            return Err(ClusterError::Registry(RegistryError::InUse(
                hash.to_owned(),
            )));
        }
        self.owners
            .purge(owner_key(hash, tenant))
            .await
            .map_err(ClusterError::unavailable)?;
        let hex = hash.trim_start_matches("sha256:");
        let others = self.owner_keys().await?.into_iter().any(|(h, _)| h == hex);
        if !others {
            self.delete_module(hash).await?;
        }
        Ok(())
    }
}

pub(super) fn registry_error(e: RegistryError) -> ClusterError {
    match e {
        RegistryError::NotFound(h) => ClusterError::ModuleNotFound(h),
        e => ClusterError::Registry(e),
    }
}
