{{/*
A stage that runs torchrun on .root.Values.<stage>.nodes pods: a Kubeflow PyTorchJob when the stage's
launcher is pytorchjob, else an Indexed Job whose pods meet over a headless Service.
Arguments: root, stage (its name), upstream (the stage whose manifest the pods wait for).
*/}}
{{- define "deepspec.distributedStage" -}}
{{- $root := .root -}}
{{- $name := .stage -}}
{{- $stage := index $root.Values $name -}}
{{- include "deepspec.checkMultiNodeStorage" (dict "root" $root "stage" $name "nodes" $stage.nodes) -}}
{{- $procs := ternary $stage.gpusPerNode $stage.cpuProcsPerNode (gt (int $stage.gpusPerNode) 0) -}}
{{- $jobName := printf "%s-%s" (include "deepspec.fullname" $root) $name -}}
{{- $pod := dict "root" $root "name" $name "stage" $stage "upstream" .upstream -}}
{{- if eq $stage.launcher "pytorchjob" }}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ $jobName }}
  labels:
    {{- include "deepspec.labels" (dict "root" $root "component" $name) | nindent 4 }}
spec:
  # The operator passes this to torchrun as PET_NPROC_PER_NODE: one process per GPU.
  nprocPerNode: {{ $procs | toString | quote }}
  runPolicy:
    cleanPodPolicy: None
    backoffLimit: {{ $stage.backoffLimit }}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: OnFailure
      template:
        {{- include "deepspec.distributedPod" (merge (dict "container" "pytorch" "restartPolicy" "OnFailure") $pod) | nindent 8 }}
    {{- if gt (int $stage.nodes) 1 }}
    Worker:
      replicas: {{ sub (int $stage.nodes) 1 }}
      restartPolicy: OnFailure
      template:
        {{- include "deepspec.distributedPod" (merge (dict "container" "pytorch" "restartPolicy" "OnFailure") $pod) | nindent 8 }}
    {{- end }}
{{- else }}
{{- if gt (int $stage.nodes) 1 }}
# Gives pod <job>-<index> the DNS name <job>-<index>.<job>, so every pod can find the rank-0 pod.
apiVersion: v1
kind: Service
metadata:
  name: {{ $jobName }}
  labels:
    {{- include "deepspec.labels" (dict "root" $root "component" $name) | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "deepspec.selectorLabels" (dict "root" $root "component" $name) | nindent 4 }}
  ports:
    - name: rendezvous
      port: {{ $stage.rendezvous.port }}
      targetPort: {{ $stage.rendezvous.port }}
---
{{- end }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $jobName }}
  labels:
    {{- include "deepspec.labels" (dict "root" $root "component" $name) | nindent 4 }}
spec:
  completionMode: Indexed
  completions: {{ $stage.nodes }}
  parallelism: {{ $stage.nodes }}
  backoffLimit: {{ $stage.backoffLimit }}
  template:
    {{- include "deepspec.distributedPod" (merge (dict "container" $name "restartPolicy" "Never" "jobName" $jobName "procs" $procs) $pod) | nindent 4 }}
{{- end }}
{{- end }}

{{/* Pod template of a distributed stage. */}}
{{- define "deepspec.distributedPod" -}}
{{- $root := .root -}}
{{- $stage := .stage -}}
metadata:
  labels:
    {{- include "deepspec.labels" (dict "root" $root "component" .name) | nindent 4 }}
spec:
  restartPolicy: {{ .restartPolicy }}
  {{- if and .jobName (gt (int $stage.nodes) 1) }}
  subdomain: {{ .jobName }}
  {{- end }}
  {{- include "deepspec.podCommon" (dict "root" $root "stage" $stage) | nindent 2 }}
  initContainers:
    {{- include "deepspec.waitInitContainer" (dict "root" $root "upstream" .upstream) | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "deepspec.image" (dict "root" $root "name" "gpu") }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if not .jobName }}
      # The training operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT,
      # which torchrun reads.
      command: ["torchrun", "-m", "deepspec.cli", {{ .name | quote }}]
      ports:
        - name: pytorchjob-port
          containerPort: 23456
      {{- else if gt (int $stage.nodes) 1 }}
      command:
        - /bin/sh
        - -c
        - |
          set -eu
          master="{{ .jobName }}-0.{{ .jobName }}"
          deadline=$(( $(date +%s) + {{ $stage.rendezvous.resolveTimeoutSeconds }} ))
          until python3 -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$master" 2>/dev/null; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
              echo "could not resolve the rank-0 pod $master within {{ $stage.rendezvous.resolveTimeoutSeconds }} s; check that Service {{ .jobName }} exists and pod index 0 is running" >&2
              exit 1
            fi
            sleep 5
          done
          is_host=false
          if [ "$JOB_COMPLETION_INDEX" = "0" ]; then is_host=true; fi
          exec torchrun --nnodes {{ $stage.nodes }} --nproc-per-node {{ .procs }} \
            --rdzv-backend c10d --rdzv-endpoint "$master:{{ $stage.rendezvous.port }}" \
            --rdzv-id {{ .jobName }} --rdzv-conf "join_timeout={{ $stage.rendezvous.joinTimeoutSeconds }},is_host=$is_host" \
            -m deepspec.cli {{ .name }}
      ports:
        - name: rendezvous
          containerPort: {{ $stage.rendezvous.port }}
      {{- else }}
      command: ["torchrun", "--standalone", "--nproc-per-node", {{ .procs | toString | quote }}, "-m", "deepspec.cli", {{ .name | quote }}]
      {{- end }}
      env:
        {{- include "deepspec.env" $root | nindent 8 }}
      volumeMounts:
        {{- include "deepspec.volumeMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
      resources:
        {{- include "deepspec.resources" (dict "root" $root "resources" $stage.resources "gpus" $stage.gpusPerNode) | nindent 8 }}
      securityContext:
        {{- include "deepspec.containerSecurityContext" $root | nindent 8 }}
  volumes:
    {{- include "deepspec.volumes" (dict "root" $root "shmSize" $stage.shmSize) | nindent 4 }}
{{- end }}
