{{/*
Names. The full name is cut to 40 characters so that "<fullname>-<stage>-<index>" pod host names and
"<fullname>-<stage>" Service and PyTorchJob names stay valid DNS labels.
*/}}
{{- define "deepspec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "deepspec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "deepspec.configMapName" -}}
{{ include "deepspec.fullname" . }}-config
{{- end }}

{{- define "deepspec.claimName" -}}
{{- default (printf "%s-data" (include "deepspec.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{- define "deepspec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deepspec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels of every object; .component is a stage name, or "storage", "config", "serviceaccount" or "test" for shared objects. */}}
{{- define "deepspec.labels" -}}
{{- $root := .root -}}
app.kubernetes.io/name: {{ include "deepspec.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: deepspec
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- if has .component (list "prompts" "regen" "cache" "train" "eval") }}
deepspec.ai/stage: {{ .component }}
{{- end }}
{{- end }}

{{/* The subset of labels that selects one stage's pods of one release. */}}
{{- define "deepspec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deepspec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
deepspec.ai/stage: {{ .component }}
{{- end }}

{{/* Image reference for "data" or "gpu": <registry>/deepspec-<name>:<tag>. */}}
{{- define "deepspec.image" -}}
{{- $root := .root -}}
{{- printf "%s/deepspec-%s:%s" $root.Values.image.registry .name (default $root.Chart.AppVersion $root.Values.image.tag) }}
{{- end }}

{{- define "deepspec.storageRoot" -}}
{{- if eq .Values.storage.type "s3" }}
{{- required "storage.s3.root must be set (s3://bucket/prefix) when storage.type is s3" .Values.storage.s3.root }}
{{- else }}
{{- printf "%s/runs" (trimSuffix "/" .Values.storage.mountPath) }}
{{- end }}
{{- end }}

{{/* Restricted pod security context (Pod Security Standards "restricted"). */}}
{{- define "deepspec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "deepspec.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* requests and limits with every quantity quoted; .gpus adds the GPU limit when above 0. */}}
{{- define "deepspec.resources" -}}
{{- $root := .root -}}
requests:
  {{- range $name, $quantity := .resources.requests }}
  {{ $name }}: {{ $quantity | quote }}
  {{- end }}
  {{- if gt (int .gpus) 0 }}
  {{ $root.Values.gpuResourceName }}: {{ .gpus | toString | quote }}
  {{- end }}
limits:
  {{- range $name, $quantity := .resources.limits }}
  {{ $name }}: {{ $quantity | quote }}
  {{- end }}
  {{- if gt (int .gpus) 0 }}
  {{ $root.Values.gpuResourceName }}: {{ .gpus | toString | quote }}
  {{- end }}
{{- end }}

{{/* Environment of every deepspec container: the config file, storage credentials, extra variables. */}}
{{- define "deepspec.env" -}}
- name: DEEPSPEC_CONFIG
  value: /etc/deepspec/config.yaml
- name: PYTHONUNBUFFERED
  value: "1"
- name: HOME
  value: /tmp
{{- if eq .Values.storage.type "s3" }}
- name: DEEPSPEC_STAGING_DIR
  value: /staging
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ required "storage.s3.existingSecret must name a Secret with the S3 credentials when storage.type is s3" .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.secretAccessKeyKey }}
{{- with .Values.storage.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- include "deepspec.hfTokenEnv" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "deepspec.hfTokenEnv" -}}
{{- with .Values.huggingFaceToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.huggingFaceToken.key }}
{{- end }}
{{- end }}

{{/* Volume mounts of every deepspec container. */}}
{{- define "deepspec.volumeMounts" -}}
- name: config
  mountPath: /etc/deepspec
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if eq .Values.storage.type "s3" }}
- name: staging
  mountPath: /staging
{{- else }}
- name: data
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
{{- end }}

{{/* Volumes of every stage pod; .shmSize sizes the memory-backed /dev/shm. */}}
{{- define "deepspec.volumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ include "deepspec.configMapName" $root }}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize | quote }}
{{- if eq $root.Values.storage.type "s3" }}
{{- $staging := $root.Values.storage.s3.staging }}
- name: staging
{{- if eq $staging.type "ephemeral" }}
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with $staging.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $staging.size | quote }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $staging.size | quote }}
{{- end }}
{{- else }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "deepspec.claimName" $root }}
{{- end }}
{{- end }}

{{/* Init container that blocks until .upstream's manifest for this config exists. */}}
{{- define "deepspec.waitInitContainer" -}}
{{- $root := .root -}}
- name: wait-for-{{ .upstream }}
  image: {{ include "deepspec.image" (dict "root" $root "name" "data") }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command:
    - deepspec
    - wait
    - {{ .upstream }}
    - --timeout
    - {{ $root.Values.wait.timeoutSeconds | toString | quote }}
    - --interval
    - {{ $root.Values.wait.intervalSeconds | toString | quote }}
  env:
    {{- include "deepspec.env" $root | nindent 4 }}
  volumeMounts:
    {{- include "deepspec.volumeMounts" $root | nindent 4 }}
  resources:
    {{- include "deepspec.resources" (dict "root" $root "resources" $root.Values.wait.resources "gpus" 0) | nindent 4 }}
  securityContext:
    {{- include "deepspec.containerSecurityContext" $root | nindent 4 }}
{{- end }}

{{/* Pod-level settings shared by every stage pod; .stage holds the stage's values. */}}
{{- define "deepspec.podCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "deepspec.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
securityContext:
  {{- include "deepspec.podSecurityContext" $root | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .stage.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .stage.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .stage.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Fail when a stage spans several nodes on a claim that only one node can mount: the pods on the other
nodes would never start.
*/}}
{{- define "deepspec.checkMultiNodeStorage" -}}
{{- $root := .root -}}
{{- if and (eq $root.Values.storage.type "pvc") (gt (int .nodes) 1) (ne $root.Values.storage.pvc.accessMode "ReadWriteMany") }}
{{- fail (printf "%s.nodes is %d but storage.pvc.accessMode is %s, which one node at a time can mount; set storage.pvc.accessMode to ReadWriteMany (with a storage class that supports it) or use storage.type s3" .stage (int .nodes) $root.Values.storage.pvc.accessMode) }}
{{- end }}
{{- if and (eq $root.Values.storage.type "s3") (eq .stage "cache") (gt (int .nodes) 1) }}
{{- fail (printf "cache.nodes is %d with storage.type s3: a cache built on several nodes must meet in one folder before it is finalized; set cache.nodes to 1 or use storage.type pvc with accessMode ReadWriteMany" (int .nodes)) }}
{{- end }}
{{- end }}
