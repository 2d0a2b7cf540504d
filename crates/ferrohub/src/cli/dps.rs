//! `ferrohub dps enrollment|group|registration|derive-key`: the device provisioning service
//! over its REST API (`/enrollments`, `/enrollmentGroups`, `/registrations`), like
//! `az iot dps enrollment`.

use clap::{Args, Subcommand};
use ferrohub_hub::provisioning::{
    Attestation, AttestationType, EnrollmentGroup, IndividualEnrollment, InitialTwin,
    InitialTwinProperties, ProvisioningStatus, RegistrationState, SymmetricKeyAttestation,
};
use serde_json::Value;

use super::client::ApiClient;
use super::{enc, ClientArgs, OutputFormat, StatusChoice};

#[derive(Debug, Subcommand)]
pub enum DpsCommand {
    /// Individual enrollments (one device each).
    Enrollment {
        #[command(subcommand)]
        cmd: EnrollmentCommand,
    },
    /// Enrollment groups (many devices, each key derived from the group's).
    Group {
        #[command(subcommand)]
        cmd: GroupCommand,
    },
    /// Registrations: what each provisioned device was assigned.
    Registration {
        #[command(subcommand)]
        cmd: RegistrationCommand,
    },
    /// Print a group member's device key: base64 HMAC-SHA256 of the registration id under
    /// the group key (given with --key, else looked up from the group).
    DeriveKey {
        /// The enrollment group whose primary key to derive from.
        #[arg(long, required_unless_present = "key")]
        group: Option<String>,
        /// The group key (base64), instead of looking the group up.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        registration_id: String,
    },
}

/// What an enrollment or group is created with.
#[derive(Debug, Args)]
pub struct EnrollmentArgs {
    /// Primary symmetric key (base64); generated when absent.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64); generated when absent.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// Initial twin tags (a JSON object), applied when the device is first created.
    #[arg(long)]
    pub tags: Option<String>,
    /// Initial desired properties (a JSON object).
    #[arg(long)]
    pub desired: Option<String>,
    #[arg(long, value_enum, default_value_t = StatusChoice::Enabled)]
    pub status: StatusChoice,
    /// Replace an existing one, if it still has this etag (`*`: whatever it has). Without it,
    /// an existing one is left alone: replacing it would generate new keys unless given, and
    /// every device provisioned with the old ones would stop being able to register.
    #[arg(long)]
    pub etag: Option<String>,
}

/// Refuses to `create` over an existing record unless `--etag` says to replace it.
async fn refuse_existing(
    api: &ApiClient,
    path: &str,
    what: &str,
    etag: &Option<String>,
) -> anyhow::Result<()> {
    if etag.is_none() && api.get(path).await.is_ok() {
        anyhow::bail!("{what} exists; pass --etag ETAG (or --etag '*') to replace it");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    Create {
        registration_id: String,
        /// The device id to provision (default: the registration id).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        args: EnrollmentArgs,
    },
    Show {
        registration_id: String,
    },
    List,
    Delete {
        registration_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    Create {
        group_id: String,
        #[command(flatten)]
        args: EnrollmentArgs,
    },
    Show {
        group_id: String,
    },
    List,
    Delete {
        group_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistrationCommand {
    Show {
        registration_id: String,
    },
    /// Forget a registration (the device stays in the registry).
    Delete {
        registration_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

fn json_object(flag: &str, text: &Option<String>) -> anyhow::Result<Option<Value>> {
    match text {
        None => Ok(None),
        Some(t) => {
            let v: Value = serde_json::from_str(t)
                .map_err(|e| anyhow::anyhow!("--{flag} is not JSON: {e}"))?;
            if !v.is_object() {
                anyhow::bail!("--{flag} must be a JSON object");
            }
            Ok(Some(v))
        }
    }
}

impl EnrollmentArgs {
    fn attestation(&self) -> Attestation {
        Attestation {
            kind: AttestationType::SymmetricKey,
            symmetric_key: Some(SymmetricKeyAttestation {
                primary_key: self.primary_key.clone(),
                secondary_key: self.secondary_key.clone(),
            }),
            x509: None,
            tpm: None,
        }
    }

    fn initial_twin(&self) -> anyhow::Result<Option<InitialTwin>> {
        let tags = json_object("tags", &self.tags)?;
        let desired = json_object("desired", &self.desired)?;
        if tags.is_none() && desired.is_none() {
            return Ok(None);
        }
        Ok(Some(InitialTwin {
            tags,
            properties: desired.map(|d| InitialTwinProperties { desired: Some(d) }),
        }))
    }

    fn status(&self) -> ProvisioningStatus {
        match self.status {
            StatusChoice::Enabled => ProvisioningStatus::Enabled,
            StatusChoice::Disabled => ProvisioningStatus::Disabled,
        }
    }
}

fn primary_key(a: &Attestation) -> &str {
    a.symmetric_key
        .as_ref()
        .and_then(|k| k.primary_key.as_deref())
        .unwrap_or("")
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_enrollment(out: OutputFormat, e: &IndividualEnrollment, head: &str) -> anyhow::Result<()> {
    if out == OutputFormat::Json {
        return print_json(e);
    }
    if !head.is_empty() {
        println!("{head} {}", e.registration_id);
    }
    println!("  {:<20} {}", "registrationId", e.registration_id);
    println!(
        "  {:<20} {}",
        "deviceId",
        e.device_id.as_deref().unwrap_or(&e.registration_id)
    );
    println!("  {:<20} {:?}", "provisioningStatus", e.provisioning_status);
    println!("  {:<20} {}", "primaryKey", primary_key(&e.attestation));
    println!("  {:<20} {}", "etag", e.etag.as_deref().unwrap_or(""));
    Ok(())
}

fn print_group(out: OutputFormat, g: &EnrollmentGroup, head: &str) -> anyhow::Result<()> {
    if out == OutputFormat::Json {
        return print_json(g);
    }
    if !head.is_empty() {
        println!("{head} {}", g.enrollment_group_id);
    }
    println!("  {:<20} {}", "enrollmentGroupId", g.enrollment_group_id);
    println!("  {:<20} {:?}", "provisioningStatus", g.provisioning_status);
    println!("  {:<20} {}", "primaryKey", primary_key(&g.attestation));
    println!("  {:<20} {}", "etag", g.etag.as_deref().unwrap_or(""));
    Ok(())
}

fn print_registration(out: OutputFormat, r: &RegistrationState) -> anyhow::Result<()> {
    if out == OutputFormat::Json {
        return print_json(r);
    }
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    println!("  {:<24} {}", "registrationId", r.registration_id);
    println!("  {:<24} {}", "status", r.status);
    println!("  {:<24} {}", "deviceId", s(&r.device_id));
    println!("  {:<24} {}", "assignedHub", s(&r.assigned_hub));
    println!("  {:<24} {}", "substatus", s(&r.substatus));
    println!(
        "  {:<24} {}",
        "enrollmentGroupId",
        s(&r.enrollment_group_id)
    );
    println!(
        "  {:<24} {}",
        "lastUpdatedDateTimeUtc",
        s(&r.last_updated_date_time_utc)
    );
    Ok(())
}

pub async fn run_dps(args: &ClientArgs, cmd: DpsCommand) -> anyhow::Result<()> {
    let out = args.output;
    // Derivation from a given key needs no hub.
    if let DpsCommand::DeriveKey {
        key: Some(key),
        registration_id,
        ..
    } = &cmd
    {
        println!(
            "{}",
            ferrohub_iothub::dps::derive_device_key(key, registration_id)?
        );
        return Ok(());
    }
    let api = ApiClient::from_args(args)?;
    match cmd {
        DpsCommand::Enrollment { cmd } => match cmd {
            EnrollmentCommand::Create {
                registration_id,
                device_id,
                args,
            } => {
                let body = IndividualEnrollment {
                    registration_id: registration_id.clone(),
                    device_id,
                    attestation: args.attestation(),
                    iot_hub_host_name: None,
                    initial_twin: args.initial_twin()?,
                    provisioning_status: args.status(),
                    reprovision_policy: None,
                    capabilities: None,
                    allocation_policy: None,
                    registration_state: None,
                    etag: None,
                    created_date_time_utc: None,
                    last_updated_date_time_utc: None,
                };
                let path = format!("/enrollments/{}", enc(&registration_id));
                refuse_existing(
                    &api,
                    &path,
                    &format!("enrollment {registration_id}"),
                    &args.etag,
                )
                .await?;
                let e: IndividualEnrollment =
                    api.put_as(&path, &body, args.etag.as_deref()).await?;
                print_enrollment(out, &e, "created enrollment")
            }
            EnrollmentCommand::Show { registration_id } => {
                let e: IndividualEnrollment = api
                    .get_as(&format!("/enrollments/{}", enc(&registration_id)))
                    .await?;
                print_enrollment(out, &e, "")
            }
            EnrollmentCommand::List => {
                let list: Vec<IndividualEnrollment> = api
                    .post_as(
                        "/enrollments/query",
                        &serde_json::json!({"query": "*"}),
                        None,
                    )
                    .await?;
                if out == OutputFormat::Json {
                    return print_json(&list);
                }
                if list.is_empty() {
                    println!("(none)");
                }
                for e in &list {
                    println!(
                        "{}  {:?}  device {}",
                        e.registration_id,
                        e.provisioning_status,
                        e.device_id.as_deref().unwrap_or(&e.registration_id)
                    );
                }
                Ok(())
            }
            EnrollmentCommand::Delete {
                registration_id,
                etag,
            } => {
                api.delete(
                    &format!("/enrollments/{}", enc(&registration_id)),
                    etag.as_deref(),
                )
                .await?;
                println!("deleted enrollment {registration_id}");
                Ok(())
            }
        },
        DpsCommand::Group { cmd } => match cmd {
            GroupCommand::Create { group_id, args } => {
                let body = EnrollmentGroup {
                    enrollment_group_id: group_id.clone(),
                    attestation: args.attestation(),
                    iot_hub_host_name: None,
                    initial_twin: args.initial_twin()?,
                    provisioning_status: args.status(),
                    reprovision_policy: None,
                    capabilities: None,
                    allocation_policy: None,
                    etag: None,
                    created_date_time_utc: None,
                    last_updated_date_time_utc: None,
                };
                let path = format!("/enrollmentGroups/{}", enc(&group_id));
                refuse_existing(
                    &api,
                    &path,
                    &format!("enrollment group {group_id}"),
                    &args.etag,
                )
                .await?;
                let g: EnrollmentGroup = api.put_as(&path, &body, args.etag.as_deref()).await?;
                print_group(out, &g, "created enrollment group")
            }
            GroupCommand::Show { group_id } => {
                let g: EnrollmentGroup = api
                    .get_as(&format!("/enrollmentGroups/{}", enc(&group_id)))
                    .await?;
                print_group(out, &g, "")
            }
            GroupCommand::List => {
                let list: Vec<EnrollmentGroup> = api
                    .post_as(
                        "/enrollmentGroups/query",
                        &serde_json::json!({"query": "*"}),
                        None,
                    )
                    .await?;
                if out == OutputFormat::Json {
                    return print_json(&list);
                }
                if list.is_empty() {
                    println!("(none)");
                }
                for g in &list {
                    println!("{}  {:?}", g.enrollment_group_id, g.provisioning_status);
                }
                Ok(())
            }
            GroupCommand::Delete { group_id, etag } => {
                api.delete(
                    &format!("/enrollmentGroups/{}", enc(&group_id)),
                    etag.as_deref(),
                )
                .await?;
                println!("deleted enrollment group {group_id}");
                Ok(())
            }
        },
        DpsCommand::Registration { cmd } => match cmd {
            RegistrationCommand::Show { registration_id } => {
                let r: RegistrationState = api
                    .get_as(&format!("/registrations/{}", enc(&registration_id)))
                    .await?;
                print_registration(out, &r)
            }
            RegistrationCommand::Delete {
                registration_id,
                etag,
            } => {
                api.delete(
                    &format!("/registrations/{}", enc(&registration_id)),
                    etag.as_deref(),
                )
                .await?;
                println!("deleted registration {registration_id}");
                Ok(())
            }
        },
        DpsCommand::DeriveKey {
            group,
            registration_id,
            ..
        } => {
            let group = group.unwrap_or_default();
            let g: EnrollmentGroup = api
                .get_as(&format!("/enrollmentGroups/{}", enc(&group)))
                .await?;
            let key = primary_key(&g.attestation);
            if key.is_empty() {
                anyhow::bail!("enrollment group {group} has no symmetric key");
            }
            println!(
                "{}",
                ferrohub_iothub::dps::derive_device_key(key, &registration_id)?
            );
            Ok(())
        }
    }
}
