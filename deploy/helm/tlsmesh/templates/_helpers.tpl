{{/* Common labels. */}}
{{- define "tlsmesh.labels" -}}
app.kubernetes.io/part-of: tlsmesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tlsmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tlsmesh.caServerName" -}}
{{- if .Values.ca.serverName -}}
{{ .Values.ca.serverName }}
{{- else if .Values.ca.address -}}
{{ (split ":" .Values.ca.address)._0 }}
{{- else -}}
tlsmesh-ca.{{ .Release.Namespace }}.svc
{{- end -}}
{{- end -}}

{{- define "tlsmesh.caAddress" -}}
{{- if .Values.ca.address -}}
{{ .Values.ca.address }}
{{- else -}}
tlsmesh-ca.{{ .Release.Namespace }}.svc:{{ .Values.ca.port }}
{{- end -}}
{{- end -}}

{{- define "tlsmesh.cniArgs" -}}
- --bin-dir
- /host/opt/cni/bin
- --conf-dir
- /host/etc/cni/net.d
- --socket-path
- {{ .Values.cni.socketPath }}
- --timeout-seconds
- {{ .Values.cni.timeoutSeconds | quote }}
- --exclude-namespace
- {{ .Release.Namespace }}
{{- if .Values.cni.failOpen }}
- --fail-open
{{- end }}
{{- end -}}
