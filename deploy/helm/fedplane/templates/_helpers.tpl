{{/* The chart's name, or nameOverride. */}}
{{- define "fedplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects are named <fullname>-hub, <fullname>-agent (the release name alone when it
names the chart: release "fedplane" gives fedplane-hub). */}}
{{- define "fedplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "fedplane.selectorLabels" (list $ "hub"). */}}
{{- define "fedplane.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fedplane.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Every label of one component's objects. */}}
{{- define "fedplane.labels" -}}
{{- $root := index . 0 -}}
{{ include "fedplane.selectorLabels" . }}
app.kubernetes.io/part-of: fedplane
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fedplane.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "fedplane.agentServiceAccount" -}}
{{- default (printf "%s-agent" (include "fedplane.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{/* Where a Secret's keys are mounted. */}}
{{- define "fedplane.secretDir" -}}
/etc/fedplane/secrets/{{ . }}
{{- end }}

{{/* A component's config file: its `config` values, each secretFiles setting pointed at its
mounted key, then the settings the chart owns (dict "config" ... "files" ... "owned" ...). */}}
{{- define "fedplane.configYaml" -}}
{{- $config := deepCopy .config -}}
{{- range $setting, $ref := .files }}
{{- if $ref }}
{{- $node := $config }}
{{- $parts := splitList "." $setting }}
{{- range initial $parts }}
{{- if not (kindIs "map" (get $node .)) }}
{{- $_ := set $node . dict }}
{{- end }}
{{- $node = get $node . }}
{{- end }}
{{- $_ := set $node (last $parts) (printf "%s/%s" (include "fedplane.secretDir" $ref.secret) $ref.key) }}
{{- end }}
{{- end }}
{{- toYaml (mergeOverwrite $config .owned) }}
{{- end }}

{{/* One read-only volume per Secret that secretFiles names, projecting only the keys named. */}}
{{- define "fedplane.secretVolumes" -}}
{{- $keys := dict }}
{{- range $setting, $ref := . }}
{{- if $ref }}
{{- $_ := set $keys $ref.secret (append (get $keys $ref.secret | default list) $ref.key | uniq) }}
{{- end }}
{{- end }}
{{- range $secret := keys $keys | sortAlpha }}
- name: secret-{{ adler32sum $secret }}
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
    items:
      {{- range get $keys $secret | sortAlpha }}
      - {key: {{ . | quote }}, path: {{ . | quote }}}
      {{- end }}
{{- end }}
{{- end }}

{{- define "fedplane.secretMounts" -}}
{{- $secrets := list }}
{{- range $setting, $ref := . }}
{{- if $ref }}
{{- $secrets = append $secrets $ref.secret }}
{{- end }}
{{- end }}
{{- range $secret := $secrets | uniq | sortAlpha }}
- name: secret-{{ adler32sum $secret }}
  mountPath: {{ include "fedplane.secretDir" $secret }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Non-root, nothing to escalate to, a read-only root filesystem: writable paths are emptyDirs
(or the agent's state claim). 65532 is the images' user. */}}
{{- define "fedplane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fedplane.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}
