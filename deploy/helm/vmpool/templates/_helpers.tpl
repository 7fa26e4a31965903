{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "vmpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart, or just the release when it already contains the chart name. */}}
{{- define "vmpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmpool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vmpool.labels" -}}
helm.sh/chart: {{ include "vmpool.chart" . }}
{{ include "vmpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmpool
{{- end -}}

{{- define "vmpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vmpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vmpool.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* "fake" or "kubevirt". */}}
{{- define "vmpool.providerKind" -}}
{{- dig "provider" "kind" "fake" (.Values.config | default dict) -}}
{{- end -}}

{{/* The namespace the VMs live in: config.provider.kubevirt.namespace, or the release namespace. */}}
{{- define "vmpool.vmNamespace" -}}
{{- dig "provider" "kubevirt" "namespace" "" (.Values.config | default dict) | default .Release.Namespace -}}
{{- end -}}

{{/* "true" when provider kubevirt must read nodes: some pool has no configured zone. */}}
{{- define "vmpool.zonesFromNodes" -}}
{{- if eq (include "vmpool.providerKind" .) "kubevirt" -}}
{{- $fromNodes := false -}}
{{- range ((.Values.config | default dict).pools | default list) -}}
{{- if not .zone -}}{{- $fromNodes = true -}}{{- end -}}
{{- end -}}
{{- if $fromNodes -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmpool.databaseSecretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "vmpool.postgresqlName" . -}}
{{- else if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "vmpool.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "vmpool.databaseSecretKey" -}}
{{- if .Values.postgresql.enabled -}}
url
{{- else if .Values.database.existingSecret -}}
{{- default "url" .Values.database.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/*
  A random salt per install, kept in the chart's database Secret (key
  roll-salt) and reused on upgrade (lookup). The pods' roll annotation is
  sha256(salt + URL): it changes when the URL does, yet anyone who may only
  get pods cannot test a guessed password against it. Memoised in .Values so
  the Secret and both Deployments use the same salt within one render
  (`helm template` has no cluster to look up: a new salt each time).
*/}}
{{- define "vmpool.databaseRollSalt" -}}
{{- if not (hasKey .Values "_vmpoolRollSalt") -}}
{{- $salt := randAlphaNum 32 -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "vmpool.databaseSecretName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "roll-salt") -}}
{{- $salt = index $existing.data "roll-salt" | b64dec -}}
{{- end -}}
{{- $_ := set .Values "_vmpoolRollSalt" $salt -}}
{{- end -}}
{{- index .Values "_vmpoolRollSalt" -}}
{{- end -}}

{{/* The pods' annotation that rolls them when database.url changes (see above). */}}
{{- define "vmpool.databaseRollAnnotation" -}}
{{- if .Values.database.url -}}
vmpool.dev/database-revision: {{ printf "%s%s" (include "vmpool.databaseRollSalt" .) .Values.database.url | sha256sum | quote }}
{{- end -}}
{{- end -}}

{{/* Fails rendering unless exactly one database source is set. */}}
{{- define "vmpool.checkDatabase" -}}
{{- if .Values.database.cloudnativepg.enabled -}}
{{- if or .Values.database.url .Values.database.existingSecret .Values.postgresql.enabled -}}
{{- fail "vmpool: database.cloudnativepg.enabled (a CloudNativePG Cluster) excludes database.url, database.existingSecret and postgresql.enabled: set one" -}}
{{- end -}}
{{- if .Values.migrations.job.enabled -}}
{{- fail "vmpool: migrations.job runs before install, before the CloudNativePG Cluster (database.cloudnativepg.enabled) exists; leave it off (the server migrates at start)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.postgresql.enabled (or .Values.database.url .Values.database.existingSecret) -}}
{{- fail "vmpool: postgresql.enabled (the evaluation database) and database.url/database.existingSecret exclude each other: set one" -}}
{{- end -}}
{{- if and .Values.postgresql.enabled .Values.migrations.job.enabled -}}
{{- fail "vmpool: migrations.job runs before install, before the evaluation database (postgresql.enabled) exists; leave it off (the server migrates at start)" -}}
{{- end -}}
{{- if and .Values.database.url .Values.database.existingSecret -}}
{{- fail "vmpool: set only one of database.url and database.existingSecret" -}}
{{- end -}}
{{- if not (or .Values.database.url .Values.database.existingSecret .Values.postgresql.enabled .Values.database.cloudnativepg.enabled) -}}
{{- fail "vmpool: a PostgreSQL database is required: set database.url (the chart creates a Secret) or database.existingSecret (and database.existingSecretKey, default \"url\") naming a Secret that holds the URL, or database.cloudnativepg.enabled (a CloudNativePG Cluster; needs the operator); to try the chart out, --set postgresql.enabled=true (an evaluation database, not for production)" -}}
{{- end -}}
{{- end -}}

{{/* Seconds in a Go-style duration of whole h/m/s units ("20s", "1m30s"), or a number; "" when unknown. */}}
{{- define "vmpool.durationSeconds" -}}
{{- $v := . -}}
{{- if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- $v | int -}}
{{- else if and (kindIs "string" $v) (regexMatch "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$" $v) (ne $v "") -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+[hms]" $v -1 -}}
{{- $n := trimSuffix "h" (trimSuffix "m" (trimSuffix "s" .)) | int -}}
{{- if hasSuffix "h" . -}}{{- $total = add $total (mul $n 3600) -}}
{{- else if hasSuffix "m" . -}}{{- $total = add $total (mul $n 60) -}}
{{- else -}}{{- $total = add $total $n -}}{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}
{{- end -}}

{{/* The config file: values.config plus what the chart owns. */}}
{{- define "vmpool.configYaml" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- if hasKey $cfg "database_url" -}}
{{- fail "vmpool: config.database_url is not allowed (it would land in a ConfigMap); set database.url or database.existingSecret" -}}
{{- end -}}
{{- if hasKey $cfg "tls" -}}
{{- fail "vmpool: config.tls is set by the chart; use the tls values (tls.enabled, tls.existingSecret or tls.certManager)" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $tls := dict "cert_file" "/etc/vmpool/tls/tls.crt" "key_file" "/etc/vmpool/tls/tls.key" -}}
{{- if .Values.tls.clientCA -}}
{{- $_ := set $tls "client_ca_file" "/etc/vmpool/tls/ca.crt" -}}
{{- $_ := set $tls "require_client_cert" .Values.tls.requireClientCert -}}
{{- end -}}
{{- $_ := set $cfg "tls" $tls -}}
{{- /* The kubelet's gRPC probes speak no TLS: a plaintext health-only port. */ -}}
{{- $_ := set $cfg "health_listen" "0.0.0.0:50052" -}}
{{- end -}}
{{- if .Values.database.cloudnativepg.enabled -}}
{{- /* The Cluster replicates synchronously: say so at start if it does not. */ -}}
{{- $db := $cfg.database | default dict -}}
{{- if not (hasKey $db "require_synchronous_standby") -}}
{{- $_ := set $db "require_synchronous_standby" "warn" -}}
{{- end -}}
{{- $_ := set $cfg "database" $db -}}
{{- end -}}
{{- $_ := set $cfg "listen" "0.0.0.0:50051" -}}
{{- $_ = set $cfg "metrics_listen" "0.0.0.0:9090" -}}
{{- $provider := $cfg.provider | default dict -}}
{{- $kubevirt := $provider.kubevirt | default dict -}}
{{- $_ = set $kubevirt "namespace" (include "vmpool.vmNamespace" .) -}}
{{- $_ = set $kubevirt "deployment" ($kubevirt.deployment | default (include "vmpool.fullname" .)) -}}
{{- $_ = set $provider "kubevirt" $kubevirt -}}
{{- $_ = set $cfg "provider" $provider -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Env VMPOOL_DATABASE_URL from a Secret; argument: dict "name" <secret> "key" <key>. */}}
{{- define "vmpool.databaseEnv" -}}
- name: VMPOOL_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end -}}

{{/* The server pods' database env: the URL from its Secret, or with
database.cloudnativepg the Cluster's -rw Service in the URL and the password
of the operator's app Secret in PGPASSWORD (asyncpg's fallback when the URL
has none), so no password needs escaping in a URL. */}}
{{- define "vmpool.serverDatabaseEnv" -}}
{{- if .Values.database.cloudnativepg.enabled -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "vmpool.cnpgName" . }}-app
      key: password
- name: VMPOOL_DATABASE_URL
  value: {{ include "vmpool.cnpgURL" . | quote }}
{{- else -}}
{{- include "vmpool.databaseEnv" (dict "name" (include "vmpool.databaseSecretName" .) "key" (include "vmpool.databaseSecretKey" .)) -}}
{{- end -}}
{{- end -}}

{{/* The CloudNativePG Cluster (database.cloudnativepg). */}}
{{- define "vmpool.cnpgName" -}}
{{- printf "%s-pg" (include "vmpool.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* Its primary through the -rw Service, verified against the cluster's CA;
read-write sessions only (a standby behind the Service is refused). */}}
{{- define "vmpool.cnpgURL" -}}
{{- $c := .Values.database.cloudnativepg -}}
{{- printf "postgresql://%s@%s-rw.%s.svc:5432/%s?sslmode=verify-full&sslrootcert=%s/ca.crt&target_session_attrs=read-write" $c.owner (include "vmpool.cnpgName" .) .Release.Namespace $c.database (include "vmpool.databaseCADir" .) -}}
{{- end -}}

{{- define "vmpool.cnpgLabels" -}}
helm.sh/chart: {{ include "vmpool.chart" . }}
app.kubernetes.io/name: {{ include "vmpool.name" . }}-pg
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: database
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmpool
{{- end -}}

{{/* The database server's CA: database.caSecret, or the CloudNativePG
cluster's <cluster>-ca (only its ca.crt is mounted, never ca.key). */}}
{{- define "vmpool.databaseCADir" -}}/etc/vmpool/database-ca{{- end -}}

{{- define "vmpool.databaseCASecret" -}}
{{- if .Values.database.cloudnativepg.enabled -}}
{{- include "vmpool.cnpgName" . }}-ca
{{- else -}}
{{- .Values.database.caSecret -}}
{{- end -}}
{{- end -}}

{{- define "vmpool.databaseCAVolumeMount" -}}
{{- if include "vmpool.databaseCASecret" . -}}
- name: database-ca
  mountPath: {{ include "vmpool.databaseCADir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "vmpool.databaseCAVolume" -}}
{{- with include "vmpool.databaseCASecret" . -}}
- name: database-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ if $.Values.database.cloudnativepg.enabled }}ca.crt{{ else }}{{ $.Values.database.caSecretKey | default "ca.crt" }}{{ end }}
        path: ca.crt
{{- end -}}
{{- end -}}

{{/* auth.mode from the config ("none" when unset). */}}
{{- define "vmpool.authMode" -}}
{{- dig "auth" "mode" "none" (.Values.config | default dict) -}}
{{- end -}}

{{/* The Secret holding tls.crt / tls.key (/ ca.crt). */}}
{{- define "vmpool.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "vmpool.fullname" .) -}}
{{- else -}}
{{- fail "vmpool: tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled" -}}
{{- end -}}
{{- end -}}

{{/* The name the server's certificate carries: the Service's in-cluster DNS name. */}}
{{- define "vmpool.serviceDNS" -}}
{{- printf "%s.%s.svc" (include "vmpool.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The evaluation PostgreSQL (postgresql.enabled). */}}
{{- define "vmpool.postgresqlName" -}}
{{- printf "%s-postgresql" (include "vmpool.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmpool.postgresqlSelectorLabels" -}}
app.kubernetes.io/name: {{ include "vmpool.name" . }}-postgresql
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: database
{{- end -}}

{{- define "vmpool.postgresqlLabels" -}}
helm.sh/chart: {{ include "vmpool.chart" . }}
{{ include "vmpool.postgresqlSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmpool
{{- end -}}

{{/* The port the kubelet's gRPC probes use: the lease port, or with TLS the plaintext health_listen port. */}}
{{- define "vmpool.healthPort" -}}
{{- if .Values.tls.enabled -}}50052{{- else -}}50051{{- end -}}
{{- end -}}

{{/* The reconciler Deployment's pods (reconciler.separate): a name of their
own, so neither the server Deployment nor the Service selects them. */}}
{{- define "vmpool.reconcilerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "vmpool.name" . }}-reconciler
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: reconciler
{{- end }}

{{- define "vmpool.reconcilerLabels" -}}
{{ include "vmpool.reconcilerSelectorLabels" . }}
helm.sh/chart: {{ include "vmpool.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmpool
{{- end }}
