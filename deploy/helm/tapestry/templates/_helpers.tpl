{{/* Names of the objects: fixed (other components and the admission policy name them). */}}
{{- define "tapestry.nodeName" -}}tapestry-node{{- end -}}
{{- define "tapestry.controllerName" -}}tapestry-controller{{- end -}}

{{/* Labels on every object. */}}
{{- define "tapestry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: tapestry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (list $ "node"). */}}
{{- define "tapestry.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: tapestry
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Image reference: (list $ "daemon"). */}}
{{- define "tapestry.image" -}}
{{- $ := index . 0 -}}
{{- $repo := index $.Values.images (index . 1) -}}
{{- printf "%s:%s" $repo (default $.Chart.AppVersion $.Values.image.tag) -}}
{{- end -}}

{{/* The keys the installer merges into the tapestry-cni conflist entry (cni-plugin/src/config.rs). */}}
{{- define "tapestry.pluginConfig" -}}
{{- $vm := dict "uid" (int .Values.vm.tapOwner.uid) "gid" (int .Values.vm.tapOwner.gid) "queues" (int .Values.vm.queues) -}}
{{- dict "socket" .Values.daemon.socket "vm" $vm | toJson -}}
{{- end -}}

{{/* Security context and mounts of the installer (init container and sidecar): root for the
host's root-owned CNI directories, no capability at all. */}}
{{- define "tapestry.installerContainer" -}}
securityContext:
  runAsUser: 0
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
volumeMounts:
  - name: cni-conf
    mountPath: /host/etc/cni/net.d
  - name: cni-bin
    mountPath: /host/opt/cni/bin
{{- end -}}

{{/* Where the kubelet probes tapestryd's /healthz: its metrics address, loopback for 0.0.0.0. */}}
{{- define "tapestry.metricsProbeHost" -}}
{{- $a := .Values.daemon.metricsAddress -}}
{{- if or (eq $a "0.0.0.0") (eq $a "") -}}127.0.0.1{{- else -}}{{ $a }}{{- end -}}
{{- end -}}
