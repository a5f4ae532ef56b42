{{/* Names and labels shared by every object. */}}

{{- define "promguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "promguard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "promguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "promguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The bundled Redis' pods: a name of their own, so promguard's selectors never match them. */}}
{{- define "promguard.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "promguard.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "promguard.redisLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "promguard.redisSelectorLabels" . }}
app.kubernetes.io/component: redis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "promguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "promguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "promguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "promguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "promguard.secretName" -}}
{{- default (include "promguard.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* Policy files: the bundled ones, then values' files (same name replaces). */}}
{{- define "promguard.policyFiles" -}}
{{- $files := dict }}
{{- if .Values.policies.bundled }}
{{- range $path, $_ := .Files.Glob "policies/*.yaml" }}
{{- $_ := set $files (base $path) ($.Files.Get $path) }}
{{- end }}
{{- end }}
{{- range $name, $text := .Values.policies.files }}
{{- $_ := set $files $name $text }}
{{- end }}
{{- toYaml $files }}
{{- end }}

{{/*
promguard's configuration: the user's `config` with what the chart owns set on top:
where it listens, where the policies and the sale-mode state live (the mounts below),
and how a request proves it came through Grafana (the secret comes from the
environment, filled from the Secret).
*/}}
{{- define "promguard.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "listen" (printf "0.0.0.0:%v" .Values.containerPort) }}
{{- $policy := deepCopy (default (dict) $config.policy) }}
{{- if include "promguard.policyFiles" . | fromYaml }}
{{- $_ := set $policy "dir" "/etc/promguard/policies" }}
{{- end }}
{{- $_ := set $policy "state_file" "/var/lib/promguard/sale-mode.json" }}
{{- $_ := set $config "policy" $policy }}
{{- if .Values.grafanaTrust }}
{{- $identity := deepCopy (default (dict) $config.identity) }}
{{- $grafana := dict "secret_header" "X-Promguard-Grafana-Secret" "secret" (dict "env" "PROMGUARD_GRAFANA_SECRET") }}
{{- $_ := set $identity "grafana" $grafana }}
{{- $_ := set $config "identity" $identity }}
{{- end }}
{{- if .Values.warm.curatedDashboards }}
{{- $warm := deepCopy (default (dict) $config.warm) }}
{{- $dashboards := default (list) $warm.dashboards }}
{{- range $path, $_ := .Files.Glob "dashboards/*.json" }}
{{- $dashboards = append $dashboards (printf "/etc/promguard/dashboards/%s" (base $path)) }}
{{- end }}
{{- $_ := set $warm "dashboards" $dashboards }}
{{- $_ := set $config "warm" $warm }}
{{- end }}
{{- if include "promguard.redis" . }}
{{- $shared := deepCopy (default (dict) $config.shared) }}
{{- $_ := set $shared "redis" (dict "url" (dict "env" "PROMGUARD_REDIS_URL") "key_prefix" .Values.redis.keyPrefix) }}
{{- $_ := set $shared "expected_replicas" (ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled) }}
{{- $_ := set $config "shared" $shared }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Non-empty when the replicas share their state in Redis (an external URL, a Secret
holding one, or the bundled Redis).
*/}}
{{- define "promguard.redis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.bundled.enabled }}true{{ end }}
{{- end }}

{{/*
A generated secret value that survives upgrades: the value given, else the one in the
release's Secret, else a new random one. Called once per key, in secret.yaml only, so
promguard's Secret and Grafana's data source share the same value.
*/}}
{{- define "promguard.secretValue" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $given := index . 2 }}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "promguard.fullname" $root) }}
{{- if and $existing (hasKey (default (dict) $existing.data) $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}
